package website

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

type siteEnv struct {
	addr string
	ca   *testpki.CA
	log  *testlog.Buffer
	up   *httptest.Server
	seen chan *http.Request // requests the upstream received
}

// newSiteEnv serves a static site www.test, an upstream site app.test, and the
// proxy's own name tp.test behind a real TLS listener with a certificate for all.
func newSiteEnv(t *testing.T, mod func(*Options)) *siteEnv {
	t.Helper()
	root := t.TempDir()
	for name, body := range map[string]string{
		"index.html":           "<h1>www home</h1>",
		"page.txt":             "a page",
		".env":                 "SECRET=1",
		".git/config":          "[core]",
		".well-known/security": "contact: me",
		"empty/readme.txt":     "no index here",
		"sub/index.html":       "sub index",
	} {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	outside := filepath.Join(t.TempDir(), "outside.txt")
	if err := os.WriteFile(outside, []byte("outside"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(root, "escape.txt")); err != nil {
		t.Fatal(err)
	}
	e := &siteEnv{ca: testpki.New(t), log: &testlog.Buffer{}, seen: make(chan *http.Request, 16)}
	e.up = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		select {
		case e.seen <- r:
		default:
		}
		if r.URL.Path == "/slow" {
			<-r.Context().Done()
			return
		}
		w.Header().Set("X-Upstream", "yes")
		io.WriteString(w, "upstream says "+r.Method+" "+r.URL.Path+" "+string(body))
	}))
	t.Cleanup(e.up.Close)
	upURL, _ := url.Parse(e.up.URL)
	own := http.NewServeMux()
	own.HandleFunc("/tp/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "tp endpoint") })
	own.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "tp landing") })
	o := Options{
		Sites:       []Site{{Name: "www.test", Root: root}, {Name: "app.test", Upstream: upURL}},
		OwnNames:    []string{"tp.test", "127.0.0.1"},
		Own:         own,
		OwnPrefixes: []string{"/tp/"},
		MaxBody:     1000,
		Logger:      slog.New(slog.NewTextHandler(e.log, nil)),
	}
	if mod != nil {
		mod(&o)
	}
	h, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{e.ca.ServerCert(t, "www.test", "app.test", "tp.test", "other.test", "127.0.0.1")}}
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	e.addr = srv.Listener.Addr().String()
	return e
}

// client speaks to the test server with the given SNI ("" sends none) whatever
// the URL's host says, so that SNI and Host can differ.
func (e *siteEnv) client(sni string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialTLSContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			cfg := &tls.Config{RootCAs: e.ca.Pool, ServerName: sni, NextProtos: []string{"h2", "http/1.1"}}
			if sni == "" {
				cfg.ServerName = "127.0.0.1" // verification only; Go sends no SNI for an IP
			}
			d := tls.Dialer{Config: cfg}
			return d.DialContext(ctx, network, e.addr)
		},
		ForceAttemptHTTP2: true,
	}, Timeout: 10 * time.Second}
}

func get(t *testing.T, c *http.Client, method, u string, body io.Reader) (int, string, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, u, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

func TestStaticSite(t *testing.T) {
	e := newSiteEnv(t, nil)
	c := e.client("www.test")
	for _, tt := range []struct {
		path   string
		status int
		body   string
	}{
		{"/", 200, "<h1>www home</h1>"},
		{"/page.txt", 200, "a page"},
		{"/sub/", 200, "sub index"},
		{"/.env", 404, ""},
		{"/.git/config", 404, ""},
		{"/%2egit/config", 404, ""},
		{"/sub/../.env", 404, ""},
		{"/.well-known/security", 200, "contact: me"},
		{"/empty/", 404, ""}, // no index.html: no listing
		{"/empty/readme.txt", 200, "no index here"},
		{"/escape.txt", 404, ""}, // a symlink out of the root
		{"/../outside.txt", 404, ""},
		{"/missing", 404, ""},
	} {
		status, body, hdr := get(t, c, "GET", "https://www.test"+tt.path, nil)
		if status != tt.status || tt.body != "" && body != tt.body {
			t.Errorf("GET %s = %d %q, want %d %q", tt.path, status, body, tt.status, tt.body)
		}
		if status == 200 && hdr.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("GET %s: no nosniff header", tt.path)
		}
		if strings.Contains(body, "readme.txt") || strings.Contains(body, "SECRET") || strings.Contains(body, "outside") {
			t.Errorf("GET %s leaked %q", tt.path, body)
		}
	}
	if status, _, _ := get(t, c, "POST", "https://www.test/page.txt", strings.NewReader("x")); status != 405 {
		t.Errorf("POST to a static site = %d, want 405", status)
	}
	if !strings.Contains(e.log.String(), "site=www.test") || !strings.Contains(e.log.String(), "path=/page.txt status=200") {
		t.Errorf("no access log line:\n%s", e.log.String())
	}
}

func TestUpstreamSite(t *testing.T) {
	e := newSiteEnv(t, func(o *Options) { o.UpstreamTimeout = 300 * time.Millisecond })
	c := e.client("app.test")
	status, body, hdr := get(t, c, "POST", "https://app.test/api?q=1", strings.NewReader("hello"))
	if status != 200 || body != "upstream says POST /api hello" || hdr.Get("X-Upstream") != "yes" {
		t.Fatalf("upstream: %d %q", status, body)
	}
	r := <-e.seen
	if r.Host != "app.test" || r.Header.Get("X-Forwarded-Proto") != "https" || r.Header.Get("X-Forwarded-Host") != "app.test" || r.Header.Get("X-Forwarded-For") == "" {
		t.Errorf("upstream saw Host %q and headers %v", r.Host, r.Header)
	}
	// Bodies over the bound: announced, and streamed without a length.
	if status, body, _ := get(t, c, "POST", "https://app.test/", strings.NewReader(strings.Repeat("x", 1001))); status != 413 || !strings.Contains(body, "up to 1000 bytes") {
		t.Errorf("oversized body: %d %q", status, body)
	}
	if status, _, _ := get(t, c, "POST", "https://app.test/", io.MultiReader(strings.NewReader(strings.Repeat("x", 2000)))); status != 413 {
		t.Errorf("oversized chunked body: %d", status)
	}
	if status, body, _ := get(t, c, "GET", "https://app.test/slow", nil); status != 504 || !strings.Contains(body, "did not answer within") {
		t.Errorf("slow upstream: %d %q", status, body)
	}
	e.up.Close()
	if status, body, _ := get(t, c, "GET", "https://app.test/", nil); status != 502 || !strings.Contains(body, "the server behind app.test did not answer") {
		t.Errorf("dead upstream: %d %q", status, body)
	}
}

// The Host header must name the site the TLS connection was opened for: a
// connection for one site must not serve another (a known bypass class).
func TestHostMustMatchSNI(t *testing.T) {
	e := newSiteEnv(t, nil)
	for _, tt := range []struct {
		sni, url string
		status   int
		body     string
	}{
		{"www.test", "https://app.test/", 421, "opened for \"www.test\""},
		{"app.test", "https://www.test/", 421, ""},
		{"www.test", "https://tp.test/tp/x", 421, ""},
		{"tp.test", "https://www.test/", 421, ""},
		{"", "https://www.test/", 421, "carried no server name"},
		{"WWW.Test", "https://www.test./page.txt", 200, "a page"},
		{"www.test", "https://www.test:8443/page.txt", 200, "a page"},
		{"tp.test", "https://tp.test/tp/x", 200, "tp endpoint"},
		{"tp.test", "https://tp.test/", 200, "tp landing"},
		{"", "https://127.0.0.1/tp/x", 200, "tp endpoint"},
	} {
		status, body, _ := get(t, e.client(tt.sni), "GET", tt.url, nil)
		if status != tt.status || !strings.Contains(body, tt.body) {
			t.Errorf("SNI %q, GET %s = %d %q; want %d %q", tt.sni, tt.url, status, body, tt.status, tt.body)
		}
	}
	// h2 too: the Go client reuses one connection per SNI here.
	c := e.client("www.test")
	resp, err := c.Get("https://app.test/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 || resp.StatusCode != 421 {
		t.Errorf("h2 mismatch: %s %d", resp.Proto, resp.StatusCode)
	}
}

// A site on the proxy's own name: the proxy's endpoints keep their paths, the
// site gets the rest; an unknown name goes to the default site.
func TestSharedNameAndDefault(t *testing.T) {
	e := newSiteEnv(t, func(o *Options) {
		o.Sites = append(o.Sites, Site{Name: "tp.test", Root: o.Sites[0].Root})
		o.Default = "www.test"
	})
	c := e.client("tp.test")
	if status, body, _ := get(t, c, "GET", "https://tp.test/tp/x", nil); status != 200 || body != "tp endpoint" {
		t.Errorf("own endpoint on a shared name: %d %q", status, body)
	}
	if status, body, _ := get(t, c, "GET", "https://tp.test/page.txt", nil); status != 200 || body != "a page" {
		t.Errorf("site on a shared name: %d %q", status, body)
	}
	if status, body, _ := get(t, e.client("other.test"), "GET", "https://other.test/page.txt", nil); status != 200 || body != "a page" {
		t.Errorf("default site: %d %q", status, body)
	}
}

func TestKnowsName(t *testing.T) {
	h, err := New(Options{Sites: []Site{{Name: "www.test", Root: t.TempDir()}}, OwnNames: []string{"tp.test"}, Own: http.NotFoundHandler()})
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]bool{"www.test": true, "WWW.TEST.": true, "tp.test": true, "": true, "other.test": false} {
		if got := h.KnowsName(name); got != want {
			t.Errorf("KnowsName(%q) = %v, want %v", name, got, want)
		}
	}
	if _, err := New(Options{Sites: []Site{{Name: "a.test", Root: "/does/not/exist"}}, Default: "b.test"}); err == nil ||
		!strings.Contains(err.Error(), "site a.test") || !strings.Contains(err.Error(), "default site \"b.test\"") {
		t.Errorf("bad options: %v", err)
	}
}
