package tpd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// siteRoot is a directory holding an index.html that says text.
func siteRoot(t *testing.T, text string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "index.html"), []byte("<!doctype html><p>"+text+"</p>"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// get fetches url over a fresh HTTP/1.1 connection to the daemon's public port
// (SNI and Host from the URL), so no connection from before a reload is reused.
func (s *siteDaemon) get(url string) (int, string, error) { return s.getAs(url, "") }

// getAs is get with the certificate verified for verifyName instead of the
// URL's host (the default site's certificate names the default site).
func (s *siteDaemon) getAs(url, verifyName string) (int, string, error) {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", s.addr)
		},
		TLSClientConfig:   &tls.Config{RootCAs: s.root},
		DisableKeepAlives: true,
	}
	if verifyName != "" { // SNI stays the URL's host; the chain is checked for verifyName
		tr.TLSClientConfig.InsecureSkipVerify = true
		tr.TLSClientConfig.VerifyConnection = func(cs tls.ConnectionState) error {
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: s.root, Intermediates: inter, DNSName: verifyName})
			return err
		}
	}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// echoThrough writes msg on a tunnel to an echo server and reads it back.
func echoThrough(t *testing.T, conn net.Conn, msg string) {
	t.Helper()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := conn.Write([]byte(msg)); err != nil {
		t.Fatalf("tunnel write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != msg {
		t.Fatalf("tunnel echo of %q: %q, %v", msg, buf, err)
	}
}

// Sites change on reload while a tunnel runs. Bad inputs first: a new site
// whose root does not exist, and a new site under a name already used by
// another site; both reloads are refused whole (max-conns, changed beside
// them, stays) and the old sites keep serving. Then a good reload adds
// blog.test (a name TP's CA did not certify at start) and removes app.test:
// blog.test gets a certificate from TP's CA and serves its page over HTTPS on
// the shared port, app.test's handshake is refused, www.test still serves, and
// the tunnel opened before every reload still carries data.
func TestReloadSitesLive(t *testing.T) {
	t.Parallel()
	s := startSiteDaemon(t, nil)
	s.waitSiteCert(t, "www.test")
	s.waitSiteCert(t, "app.test")
	if code, body, err := s.get("https://app.test/x"); err != nil || code != http.StatusOK || !strings.Contains(body, "app.test upstream") {
		t.Fatalf("app.test before the reload: %d %q %v", code, body, err)
	}

	c, _, _ := enrollClient(t, s.d, s.url, "alice", "laptop")
	dl, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	dl.Transport = clients.TransportTLS
	tunnel, err := dl.DialContext(context.Background(), "tcp", testnet.Echo(t))
	if err != nil {
		t.Fatal(err)
	}
	defer tunnel.Close()
	echoThrough(t, tunnel, "before the reloads")

	next := *s.d.config()
	s.d.SetReloader(func() (config.Server, error) { return next, nil }, new(slog.LevelVar))
	base := next

	// Bad input 1: a site whose root directory does not exist.
	next.Sites = append(slices.Clone(base.Sites), config.Site{Name: "blog.test", Root: filepath.Join(t.TempDir(), "missing")})
	next.MaxConns = 7
	if _, err := s.d.Reload(context.Background()); err == nil || !strings.Contains(err.Error(), "blog.test") {
		t.Errorf("reload with a missing site root: %v; want a refusal naming blog.test", err)
	}
	// Bad input 2: a second site named www.test.
	next = base
	next.Sites = append(slices.Clone(base.Sites), config.Site{Name: "www.test", Root: siteRoot(t, "twin")})
	next.MaxConns = 7
	if _, err := s.d.Reload(context.Background()); err == nil || !strings.Contains(err.Error(), "configured twice") {
		t.Errorf("reload with www.test twice: %v; want a refusal saying it is configured twice", err)
	}
	if got := s.d.proxy.Limits().MaxConns; got == 7 {
		t.Error("a refused reload applied max-conns")
	}
	if code, body, err := s.get("https://www.test/"); err != nil || code != http.StatusOK || !strings.Contains(body, "Hello from www.test") {
		t.Errorf("www.test after the refused reloads: %d %q %v", code, body, err)
	}
	if _, _, err := s.get("https://app.test/x"); err != nil {
		t.Errorf("app.test after the refused reloads: %v", err)
	}

	// Good: add blog.test, remove app.test.
	next = base
	next.Sites = []config.Site{base.Sites[0], {Name: "blog.test", Root: siteRoot(t, "Hello from blog.test")}}
	res, err := s.d.Reload(context.Background())
	if err != nil {
		t.Fatalf("reload adding blog.test and removing app.test: %v", err)
	}
	// Each site once, as tpd.yaml spells it; www.test, unchanged, not at all
	// (the whole list was once printed as Go structs: "sites: [{www.test …} …] → …").
	want := []string{"sites: added {name: blog.test, root: " + next.Sites[1].Root + "}",
		"sites: removed {name: app.test, upstream: " + base.Sites[1].Upstream + "}"}
	if !slices.Equal(res.Changed, want) || base.Sites[1].Name != "app.test" {
		t.Errorf("changes %q; want %q", res.Changed, want)
	}
	leaf := s.waitSiteCert(t, "blog.test") // verified against TP's root
	if !slices.Contains(leaf.DNSNames, "blog.test") {
		t.Errorf("blog.test's certificate names %v", leaf.DNSNames)
	}
	if code, body, err := s.get("https://blog.test/"); err != nil || code != http.StatusOK || !strings.Contains(body, "Hello from blog.test") {
		t.Errorf("blog.test after the reload: %d %q %v", code, body, err)
	}
	if code, body, err := s.get("https://www.test/"); err != nil || code != http.StatusOK || !strings.Contains(body, "Hello from www.test") {
		t.Errorf("www.test after the reload: %d %q %v", code, body, err)
	}
	if code, body, err := s.get("https://app.test/x"); err == nil {
		t.Errorf("app.test still answers after its removal: %d %q", code, body)
	}
	echoThrough(t, tunnel, "after the reloads")
}

// A tpd started without any site gets its first one, and a default site, by
// reload: the embedded CA certifies the new name (its websites' provisioner
// is on from the start), www.test serves over HTTPS, and a name no site has
// gets the default site's page.
func TestReloadFirstSite(t *testing.T) {
	t.Parallel()
	s := startSiteDaemon(t, func(c *config.Server) { c.Sites = nil })
	if _, _, err := s.get("https://www.test/"); err == nil {
		t.Fatal("www.test answers before it is configured")
	}
	next := *s.d.config()
	s.d.SetReloader(func() (config.Server, error) { return next, nil }, new(slog.LevelVar))
	next.Sites = []config.Site{{Name: "www.test", Root: siteRoot(t, "Hello from www.test")}}
	next.DefaultSite = "www.test"
	if _, err := s.d.Reload(context.Background()); err != nil {
		t.Fatalf("reload adding the first site: %v", err)
	}
	s.waitSiteCert(t, "www.test")
	if code, body, err := s.get("https://www.test/"); err != nil || code != http.StatusOK || !strings.Contains(body, "Hello from www.test") {
		t.Errorf("www.test after the reload: %d %q %v", code, body, err)
	}
	if code, body, err := s.getAs("https://other.test/", "www.test"); err != nil || code != http.StatusOK || !strings.Contains(body, "Hello from www.test") {
		t.Errorf("other.test (default site) after the reload: %d %q %v", code, body, err)
	}
}

// A site may not take a name an agent exposes publicly by SNI right now. Bad
// input: a reload adding the site blog.example.test while alice's agent passes
// blog.example.test through; it is refused, naming the exposure, and the name
// still reaches the agent.
func TestReloadSiteRefusesExposedName(t *testing.T) {
	t.Parallel()
	d, url := startDaemonCfg(t, fmt.Sprintf(publicPolicy, 1), nil)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	ca := testpki.New(t)
	local := testnet.Upper(t)
	stop, err := runAgent(t, alice, clients.TransportTLS, []clients.Exposed{{Name: "blog", Local: local, PublicSNI: "blog.example.test",
		TLS: &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "blog.example.test")}}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()

	next := *d.config()
	d.SetReloader(func() (config.Server, error) { return next, nil }, new(slog.LevelVar))
	next.Sites = []config.Site{{Name: "blog.example.test", Root: siteRoot(t, "a site")}}
	if _, err := d.Reload(context.Background()); err == nil || !strings.Contains(err.Error(), "exposes that name publicly") {
		t.Fatalf("reload adding a site on an exposed name: %v; want a refusal naming the exposure", err)
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", hostPort(t, url),
		&tls.Config{ServerName: "blog.example.test", RootCAs: ca.Pool})
	if err != nil {
		t.Fatalf("the exposed name after the refused reload: %v", err)
	}
	c.Close()
}
