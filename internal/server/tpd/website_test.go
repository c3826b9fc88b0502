package tpd

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/website"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

type siteDaemon struct {
	d    *Daemon
	url  string
	addr string // public TCP (and UDP) address
	root *x509.CertPool
	log  *testlog.Buffer
	cfg  config.Server
}

// siteACME is held by each test whose tpd obtains website certificates from
// its embedded CA. certmagic keeps a process's tls-alpn-01 challenges in one
// map keyed by name, so two tpds of one test binary obtaining www.test at once
// took or removed each other's challenge: a validation that failed left its
// authorization pending, and the certificate never came. (One tpd per process
// never meets this: its names are its own.)
var siteACME sync.Mutex

func oneSiteACMEAtATime(t *testing.T) {
	siteACME.Lock()
	t.Cleanup(siteACME.Unlock)
}

// startSiteDaemon runs tpd in-process with a static site www.test and an
// upstream site app.test; site certificates come from the embedded CA over ACME.
func startSiteDaemon(t *testing.T, mod func(*config.Server)) *siteDaemon {
	t.Helper()
	oneSiteACMEAtATime(t)
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte("<!doctype html><title>www</title><p id=greeting>Hello from www.test</p>"), 0o644); err != nil {
		t.Fatal(err)
	}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "app.test upstream: %s %s host=%s", r.Method, r.URL.Path, r.Host)
	}))
	t.Cleanup(up.Close)

	logs := &testlog.Buffer{}
	t.Cleanup(func() { // registered before the daemon's, so it runs after the daemon stopped
		if t.Failed() {
			t.Logf("tpd log:\n%s", logs.String())
		}
	})
	d := serveDaemon(t, allowAlice, func(c *config.Server) {
		c.Sites = []config.Site{{Name: "www.test", Root: root}, {Name: "app.test", Upstream: up.URL}}
		if mod != nil {
			mod(c)
		}
	}, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	pool := x509.NewCertPool()
	pool.AddCert(d.pki.Root)
	return &siteDaemon{d: d, url: d.cfg.PublicURL(), addr: d.cfg.Listen, root: pool, log: logs, cfg: d.cfg}
}

// waitSiteCert polls until the public port presents a certificate for name
// (certmagic obtains it in the background) and returns it.
func (s *siteDaemon) waitSiteCert(t *testing.T, name string) *x509.Certificate {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", s.addr,
			&tls.Config{ServerName: name, RootCAs: s.root, NextProtos: []string{"http/1.1"}})
		if err == nil {
			leaf := c.ConnectionState().PeerCertificates[0]
			c.Close()
			return leaf
		}
		if time.Now().After(deadline) {
			t.Fatalf("no certificate for %s within 90s: %v", name, err)
		}
		time.Sleep(50 * time.Millisecond) // polling for certmagic, bounded by the deadline above
	}
}

// clients returns HTTP clients for HTTP/1.1, h2 and h3 that reach the daemon's
// port for any URL host (SNI and Host come from the URL).
func (s *siteDaemon) clients(t *testing.T) map[string]*http.Client {
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", s.addr)
	}
	h1 := &http.Transport{DialContext: dial, TLSClientConfig: &tls.Config{RootCAs: s.root}}
	h2 := &http.Transport{DialContext: dial, TLSClientConfig: &tls.Config{RootCAs: s.root}, ForceAttemptHTTP2: true}
	h3 := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: s.root},
		Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, cfg *quic.Config) (*quic.Conn, error) {
			return quic.DialAddr(ctx, s.addr, tlsCfg, cfg)
		}}
	t.Cleanup(func() { h1.CloseIdleConnections(); h2.CloseIdleConnections(); h3.Close() })
	return map[string]*http.Client{
		"HTTP/1.1": {Transport: h1, Timeout: 20 * time.Second},
		"HTTP/2.0": {Transport: h2, Timeout: 20 * time.Second},
		"HTTP/3.0": {Transport: h3, Timeout: 20 * time.Second},
	}
}

func fetch(t *testing.T, c *http.Client, url string) (*http.Response, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// certmagic obtains the sites' certificates over real ACME from the embedded CA,
// validated by tls-alpn-01 through the public port's demux; then HTTP/1.1, h2 and
// h3 reach the static and the upstream site on the port that carries a tp
// tunnel at the same time, and a request for one site on a connection for the
// other gets 421.
func TestSitesOverACMEAndAllProtocols(t *testing.T) {
	t.Parallel()
	s := startSiteDaemon(t, nil)
	for _, name := range []string{"www.test", "app.test"} {
		leaf := s.waitSiteCert(t, name)
		if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != name || leaf.Issuer.CommonName != s.d.pki.Intermediate.Subject.CommonName {
			t.Errorf("%s: certificate for %v issued by %q", name, leaf.DNSNames, leaf.Issuer.CommonName)
		}
		if len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth {
			t.Errorf("%s: site certificate usages %v; want serverAuth only", name, leaf.ExtKeyUsage)
		}
		if life := leaf.NotAfter.Sub(leaf.NotBefore); life > 25*time.Hour {
			t.Errorf("%s: certificate lives %s", name, life)
		}
	}
	if !strings.Contains(s.log.String(), "challenge=tls-alpn-01") {
		t.Errorf("no tls-alpn-01 challenge was answered through the demux")
	}
	if m, _ := filepath.Glob(filepath.Join(s.cfg.SitesDir(), "certificates", "*", "www.test", "www.test.crt")); len(m) != 1 {
		t.Errorf("site certificate not stored in the data dir: %v", m)
	}

	// A tp tunnel that stays open across all the web requests.
	c, _, _ := enrollClient(t, s.d, s.url, "alice", "laptop")
	echo := testnet.Echo(t)
	dialer, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	tunnel, err := dialer.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	defer tunnel.Close()
	roundTrip := func(msg string) {
		t.Helper()
		_ = tunnel.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(tunnel, msg); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, len(msg))
		if _, err := io.ReadFull(tunnel, b); err != nil || string(b) != msg {
			t.Fatalf("tunnel: %q %v", b, err)
		}
	}
	roundTrip("before")

	for proto, client := range s.clients(t) {
		resp, body := fetch(t, client, "https://www.test/")
		if resp.StatusCode != 200 || resp.Proto != proto || !strings.Contains(body, "Hello from www.test") {
			t.Errorf("%s static: %s %s %q", proto, resp.Status, resp.Proto, body)
		}
		if proto != "HTTP/3.0" {
			if alt := resp.Header.Get("Alt-Svc"); !strings.HasPrefix(alt, `h3=":443"`) {
				t.Errorf("%s: Alt-Svc %q", proto, alt)
			}
		}
		resp, body = fetch(t, client, "https://app.test/api")
		if resp.StatusCode != 200 || resp.Proto != proto || body != "app.test upstream: GET /api host=app.test" {
			t.Errorf("%s upstream: %s %s %q", proto, resp.Status, resp.Proto, body)
		}
		roundTrip(proto)
	}

	// SNI of one site, Host of the other: 421.
	conn, err := tls.Dial("tcp", s.addr, &tls.Config{ServerName: "www.test", RootCAs: s.root, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
	raw, _ := io.ReadAll(conn)
	if !bytes.HasPrefix(raw, []byte("HTTP/1.1 421 ")) {
		t.Errorf("SNI www.test with Host app.test: %q", raw)
	}
	// An unknown name: the handshake fails cleanly.
	if _, err := tls.Dial("tcp", s.addr, &tls.Config{ServerName: "nobody.test", RootCAs: s.root}); err == nil || !strings.Contains(err.Error(), "unrecognized name") {
		t.Errorf("unknown name: %v", err)
	}
	// tpd's own endpoints on its own name still answer.
	resp, body := fetch(t, s.clients(t)["HTTP/2.0"], s.url+"/")
	if resp.StatusCode != 200 || !strings.Contains(body, "This is a TP server") {
		t.Errorf("landing page: %s %q", resp.Status, body)
	}
	roundTrip("after")
}

// The plain-HTTP listener redirects to HTTPS for known names and refuses others.
func TestHTTPListenRedirects(t *testing.T) {
	t.Parallel()
	s := startSiteDaemon(t, func(c *config.Server) { c.HTTPListen = "127.0.0.1:0" })
	s.waitSiteCert(t, "www.test") // Serve is running: the plain-HTTP listener is open
	addr := s.d.web.http.Load()
	if addr == nil {
		t.Fatal("no plain-HTTP listener")
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }, Timeout: 10 * time.Second}
	req, _ := http.NewRequest("GET", "http://"+*addr+"/a/b?c=d", nil)
	req.Host = "www.test"
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	_, port, _ := net.SplitHostPort(s.addr)
	if want := "https://www.test:" + port + "/a/b?c=d"; resp.StatusCode != http.StatusPermanentRedirect || resp.Header.Get("Location") != want {
		t.Errorf("redirect: %s to %q, want 308 to %q", resp.Status, resp.Header.Get("Location"), want)
	}
	req.Host = "evil.test"
	if resp, err = client.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("unknown name over HTTP: %s", resp.Status)
	}
}

// A pass-through lookup cannot take tpd's own names or a site's.
func TestPassthroughGuard(t *testing.T) {
	t.Parallel()
	d := &Daemon{cfg: config.DefaultServer()}
	if err := d.newWebsite(http.NotFoundHandler()); err != nil {
		t.Fatal(err)
	}
	d.cfg.Sites = nil
	h, err := website.New(website.Options{Sites: []website.Site{{Name: "www.test", Root: t.TempDir()}}, OwnNames: []string{"tp.test"}, Own: http.NotFoundHandler()})
	if err != nil {
		t.Fatal(err)
	}
	d.web.handler.Store(h)
	guard := d.passthroughGuard(func(string) (func(context.Context, net.Conn), bool) {
		return func(context.Context, net.Conn) {}, true
	})
	for name, want := range map[string]bool{"tp.test": false, "www.test": false, "exposed.test": true} {
		if _, ok := guard(name); ok != want {
			t.Errorf("pass-through for %s: %v, want %v", name, ok, want)
		}
	}
}
