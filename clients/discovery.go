package clients

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"sync"
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

// discoveryState is what a Dialer learnt from the server's discovery document.
type discoveryState struct {
	sync.Mutex
	tried bool // fetched (or failed to) once in this Dialer's life
	doc   *wire.Discovery
}

// discoveryURL is where the Dialer fetches the server's document.
func (d *Dialer) discoveryURL() string {
	if d.DiscoveryURL != "" {
		return d.DiscoveryURL
	}
	return "https://" + d.Server + wire.DiscoveryPath
}

// discover returns the server's discovery document: the Dialer's, the
// Cache's, or fetched now, once per Dialer; nil when the server did not give
// one (an older tpd, a failure: only a debug line says so).
func (d *Dialer) discover(ctx context.Context) *wire.Discovery {
	d.disco.Lock()
	defer d.disco.Unlock()
	if d.disco.tried {
		return d.disco.doc
	}
	d.disco.tried = true
	if d.Cache != nil {
		if doc, ok := d.Cache.Discovery(d.Server); ok {
			d.disco.doc = &doc
			return d.disco.doc
		}
	}
	cfg, err := d.tlsConfig()
	if err == nil {
		var doc wire.Discovery
		if doc, err = FetchDiscovery(ctx, d.discoveryURL(), cfg); err == nil {
			d.disco.doc = &doc
			if d.Cache != nil {
				_ = d.Cache.PutDiscovery(d.Server, doc) // a cache that cannot be written only costs a fetch
			}
			return d.disco.doc
		}
	}
	d.logger().LogAttrs(ctx, slog.LevelDebug, "no transport discovery document; racing QUIC and TLS as usual",
		slog.String("server", d.Server), slog.String("err", err.Error()))
	return nil
}

// quicNotOffered reports whether auto should skip QUIC without trying it: the
// server's discovery document, fetched when nothing is cached for the server,
// offers no QUIC. TLS is then remembered as the transport, as a race won by
// TLS would be.
func (d *Dialer) quicNotOffered(ctx context.Context) bool {
	if d.Cache != nil && d.Cache.Get(d.Server) != "" {
		return false
	}
	doc := d.discover(ctx)
	if doc == nil {
		return false
	}
	if _, ok := doc.Find(wire.DiscoverQUIC); ok {
		return false
	}
	d.quic.mu.Lock()
	d.quic.tlsUntil = time.Now().Add(DefaultTransportCacheTTL)
	d.quic.mu.Unlock()
	if d.Cache != nil {
		_ = d.Cache.Put(d.Server, TransportTLS)
	}
	return true
}

func (d *Dialer) logger() *slog.Logger {
	if d.Logger != nil {
		return d.Logger
	}
	return discardLog
}

var discardLog = slog.New(slog.DiscardHandler)
