package tpd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/internal/config"
	"github.com/tp-proxy/tp/proxy/wire"
)

// discoveryClient is an HTTPS client without a client certificate that
// reaches the daemon's port whatever the URL's host and port say, so that a
// test can act as a client behind a port mapping.
func discoveryClient(t *testing.T, d *Daemon) *http.Client {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(d.pki.Root)
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", d.cfg.Listen)
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

func getDiscovery(t *testing.T, c *http.Client, method, u, body string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

// The document answers without a client certificate over h2, is cacheable,
// parses with the reader clients use, and names the host and port the client
// used: behind a port mapping (the client's Host says port 9443 while tpd
// listens elsewhere) the transports say 9443.
func TestDiscoveryDocument(t *testing.T) {
	d := serveDaemon(t, allowAlice, func(c *config.Server) { c.PublicPorts = "20000-20010,8080/tcp" }, nil)
	c := discoveryClient(t, d)
	_, port, _ := net.SplitHostPort(d.cfg.Listen)

	for _, tc := range []struct {
		host     string
		wantPort int
	}{
		{"localhost:" + port, atoi(t, port)},
		{"localhost:9443", 9443}, // a port mapping: 9443 outside, the listener's port inside
		{"localhost", 443},       // no port in Host: HTTPS's
	} {
		resp, body := getDiscovery(t, c, http.MethodGet, "https://"+tc.host+wire.DiscoveryPath, "")
		if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
			t.Fatalf("Host %s: %s over %s: %s", tc.host, resp.Status, resp.Proto, body)
		}
		if ct, cc := resp.Header.Get("Content-Type"), resp.Header.Get("Cache-Control"); ct != "application/json" || !strings.Contains(cc, "max-age=") {
			t.Errorf("Host %s: Content-Type %q, Cache-Control %q", tc.host, ct, cc)
		}
		doc, err := wire.ParseDiscovery(body)
		if err != nil {
			t.Fatalf("Host %s: %v\n%s", tc.host, err, body)
		}
		if doc.Software != "tpd" || doc.Version != Version || doc.ALPN != wire.ALPN || doc.Chosen != nil {
			t.Errorf("Host %s: document %+v", tc.host, doc)
		}
		for _, name := range []string{wire.DiscoverQUIC, wire.DiscoverTLS} {
			tr, ok := doc.Find(name)
			if !ok || tr.Host != "localhost" || tr.Port != tc.wantPort {
				t.Errorf("Host %s: transport %s = %+v, %v; want localhost:%d", tc.host, name, tr, ok, tc.wantPort)
			}
		}
		if doc.Reverse == nil || doc.Reverse.Zone != d.cfg.ReverseZone || len(doc.Reverse.PublicPorts) != 2 ||
			doc.Reverse.PublicPorts[1] != (wire.DiscoveredPorts{Lo: 8080, Hi: 8080, Net: "tcp"}) {
			t.Errorf("Host %s: reverse %+v", tc.host, doc.Reverse)
		}
	}

	base := "https://localhost:" + port + wire.DiscoveryPath
	// The client's list in its order: the first the server offers is chosen;
	// names the server does not know and other parameters are ignored.
	for _, tc := range []struct{ method, query, body, want string }{
		{http.MethodGet, "?supports=wireguard,tls,quic&x=1", "", wire.DiscoverTLS},
		{http.MethodGet, "?supports=ssh&supports=quic", "", wire.DiscoverQUIC},
		{http.MethodGet, "?supports=QUIC%2Ctls", "", wire.DiscoverQUIC},
		{http.MethodGet, "?supports=ssh", "", ""},
		{http.MethodPost, "", `{"supports":["ssh","quic"],"client":"x"}`, wire.DiscoverQUIC},
	} {
		resp, body := getDiscovery(t, c, tc.method, base+tc.query, tc.body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s %s %s: %s: %s", tc.method, tc.query, tc.body, resp.Status, body)
		}
		doc, err := wire.ParseDiscovery(body)
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		if doc.Chosen != nil {
			got = doc.Chosen.Name
		}
		if got != tc.want {
			t.Errorf("%s %s %s: chosen %q, want %q", tc.method, tc.query, tc.body, got, tc.want)
		}
	}

	// Bounded input: each bad request is refused whole, with 400 or 405.
	long := strings.Repeat("a", wire.MaxDiscoveryNameLen+1)
	many := strings.TrimSuffix(strings.Repeat("tls,", wire.MaxDiscoverySupports+1), ",")
	for _, tc := range []struct {
		what, method, query, body string
		want                      int
	}{
		{"a query over the bound", http.MethodGet, "?x=" + strings.Repeat("y", wire.MaxDiscoveryRequestLen), "", 400},
		{"a name over the bound", http.MethodGet, "?supports=" + long, "", 400},
		{"too many names", http.MethodGet, "?supports=" + many, "", 400},
		{"a bad escape", http.MethodGet, "?supports=%zz", "", 400},
		{"a body over the bound", http.MethodPost, "", `{"supports":["` + strings.Repeat("x", wire.MaxDiscoveryRequestLen) + `"]}`, 400},
		{"a body that is not JSON", http.MethodPost, "", `supports=tls`, 400},
		{"a body with two objects", http.MethodPost, "", `{"supports":["tls"]}{}`, 400},
		{"a PUT", http.MethodPut, "", `{}`, 405},
	} {
		resp, body := getDiscovery(t, c, tc.method, base+tc.query, tc.body)
		if resp.StatusCode != tc.want {
			t.Errorf("%s: %s, want %d: %s", tc.what, resp.Status, tc.want, body)
		}
	}
	// A path below the document is not it.
	if resp, _ := getDiscovery(t, c, http.MethodGet, base+"/reverse-http/x", ""); resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET %s/reverse-http/x: %s, want 404", base, resp.Status)
	}

	// HTTP/3 answers the same document.
	pool := x509.NewCertPool()
	pool.AddCert(d.pki.Root)
	h3 := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: pool},
		Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, cfg *quic.Config) (*quic.Conn, error) {
			return quic.DialAddr(ctx, d.cfg.Listen, tlsCfg, cfg)
		}}
	defer h3.Close()
	resp, body := getDiscovery(t, &http.Client{Transport: h3, Timeout: 20 * time.Second}, http.MethodGet, base+"?supports=tls", "")
	if doc, err := wire.ParseDiscovery(body); resp.ProtoMajor != 3 || err != nil || doc.Chosen == nil || doc.Chosen.Name != wire.DiscoverTLS {
		t.Errorf("over HTTP/3: %s %s, %v: %s", resp.Proto, resp.Status, err, body)
	}
}

// Without QUIC the document offers no UDP transport at all.
func TestDiscoveryWithoutQUIC(t *testing.T) {
	d := serveDaemon(t, allowAlice, func(c *config.Server) { c.QUIC = false }, nil)
	resp, body := getDiscovery(t, discoveryClient(t, d), http.MethodGet, "https://localhost"+wire.DiscoveryPath+"?supports=quic,tls", "")
	doc, err := wire.ParseDiscovery(body)
	if resp.StatusCode != http.StatusOK || err != nil {
		t.Fatalf("%s, %v: %s", resp.Status, err, body)
	}
	for _, tr := range doc.Transports {
		if tr.Network == "udp" {
			t.Errorf("QUIC is off, yet the document offers %+v", tr)
		}
	}
	if doc.Chosen == nil || doc.Chosen.Name != wire.DiscoverTLS {
		t.Errorf("supports=quic,tls without QUIC: chosen %+v, want tls", doc.Chosen)
	}
}

// On a proxy name the CONNECT proxy and the reverse-tunnel endpoints are
// advertised with that name; on tpd's own name with the first proxy name; the
// port is the client's in both cases. ProxyHTTP serves the document and
// nothing else.
func TestDiscoveryProxyNames(t *testing.T) {
	h := discoveryHandler{discoveryOptions{QUIC: true, ProxyNames: []string{"proxy.example", "p2.example"}, ReverseZone: "rev.example"}}
	d := &Daemon{discovery: h}
	for _, tc := range []struct{ host, wantProxy string }{
		{"tp.example:8443", "proxy.example"},
		{"P2.example.:8443", "p2.example"},
	} {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodGet, "https://"+tc.host+wire.DiscoveryPath+"?supports=connect-h3", nil)
		req.Host = tc.host
		d.ProxyHTTP().ServeHTTP(rec, req)
		doc, err := wire.ParseDiscovery(rec.Body.Bytes())
		if err != nil {
			t.Fatalf("Host %s: %v: %s", tc.host, err, rec.Body)
		}
		c, ok := doc.Find(wire.DiscoverConnect)
		wantURL := "https://" + tc.wantProxy + ":8443"
		if !ok || c.Host != tc.wantProxy || c.Port != 8443 || c.URL != wantURL || c.Network != "tcp" {
			t.Errorf("Host %s: connect %+v, %v", tc.host, c, ok)
		}
		if doc.Chosen == nil || doc.Chosen.Name != wire.DiscoverConnectH3 || doc.Chosen.Network != "udp" {
			t.Errorf("Host %s: chosen %+v", tc.host, doc.Chosen)
		}
		if doc.Reverse == nil || doc.Reverse.HTTP != wantURL+"/.well-known/tp/reverse-http/{label}" ||
			doc.Reverse.ListenTCP != wantURL+"/.well-known/listen-tcp/{addr}/{port}/" {
			t.Errorf("Host %s: reverse %+v", tc.host, doc.Reverse)
		}
	}
	rec := httptest.NewRecorder()
	d.ProxyHTTP().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "https://proxy.example/other", nil))
	if rec.Code != http.StatusNotFound {
		t.Errorf("ProxyHTTP GET /other: %d, want 404", rec.Code)
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
