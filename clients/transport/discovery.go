package transport

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// DiscoveryTimeout bounds the fetch of a server's discovery document: it runs
// before the first connection to a server, so a server that does not answer
// it must cost little.
const DiscoveryTimeout = 3 * time.Second

// FetchDiscovery GETs the transport discovery document at url (https only)
// with tlsCfg's roots and server name, without a client certificate, and
// parses it (wire.ParseDiscovery): status 200, Content-Type application/json,
// at most wire.MaxDiscoverySize bytes, no redirect followed. supports, when
// given, asks the server to choose among them (Discovery.Chosen).
func FetchDiscovery(ctx context.Context, url string, tlsCfg *tls.Config, supports ...string) (wire.Discovery, error) {
	ctx, cancel := context.WithTimeout(ctx, DiscoveryTimeout)
	defer cancel()
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if tlsCfg != nil {
		cfg.RootCAs, cfg.ServerName = tlsCfg.RootCAs, tlsCfg.ServerName
	}
	tr := &http.Transport{
		Proxy:                  nil, // the TP server is reached directly, as the tunnels are
		DialContext:            (&net.Dialer{}).DialContext,
		TLSClientConfig:        cfg,
		ForceAttemptHTTP2:      true,
		DisableKeepAlives:      true,
		MaxResponseHeaderBytes: 16 << 10,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{
		Transport:     tr,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	if len(supports) > 0 {
		q := ""
		for i, s := range supports {
			if i > 0 {
				q += ","
			}
			q += s
		}
		url += "?supports=" + q
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return wire.Discovery{}, err
	}
	if req.URL.Scheme != "https" {
		return wire.Discovery{}, fmt.Errorf("discovery URL %s is not https", url)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return wire.Discovery{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return wire.Discovery{}, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	if mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return wire.Discovery{}, fmt.Errorf("GET %s: Content-Type %q, not application/json", url, resp.Header.Get("Content-Type"))
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, wire.MaxDiscoverySize+1))
	if err != nil {
		return wire.Discovery{}, fmt.Errorf("GET %s: %w", url, err)
	}
	return wire.ParseDiscovery(body)
}
