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
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// testReverseHTTP is a reverse registry of the shape the proxy's is: names
// held by HTTP tunnels, each with a round-tripper; the test holds and drops
// names.
type testReverseHTTP struct {
	mu sync.Mutex
	m  map[string]testHeld
}

type testHeld struct {
	rt          http.RoundTripper
	devicesOnly bool
}

var (
	_ reverseHTTP            = (*testReverseHTTP)(nil)
	_ reverseHTTPDevicesOnly = (*testReverseHTTP)(nil)
)

func (r *testReverseHTTP) ReverseHTTP(host string) (http.RoundTripper, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	h, ok := r.m[host]
	return h.rt, ok
}

func (r *testReverseHTTP) ReverseHTTPDevicesOnly(host string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.m[host].devicesOnly
}

func (r *testReverseHTTP) hold(name string, h testHeld) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[string]testHeld{}
	}
	r.m[name] = h
}

func (r *testReverseHTTP) drop(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.m, name)
}

// revHTTPEnv is tpd with a reverse registry whose names reach a real loopback
// HTTP server through a real http.Transport, as a tunnel's round-tripper does.
type revHTTPEnv struct {
	d        *Daemon
	reg      *testReverseHTTP
	rt       http.RoundTripper
	upstream atomic.Int32 // requests the loopback server saw
	log      *testlog.Buffer
	port     string
}

func startRevHTTP(t *testing.T) *revHTTPEnv {
	t.Helper()
	// The names' certificates come on demand through certmagic, which waits,
	// process-wide, for another obtain of the same name to finish, whichever
	// tpd of this test binary runs it (siteACME).
	oneSiteACMEAtATime(t)
	e := &revHTTPEnv{reg: &testReverseHTTP{}, log: &testlog.Buffer{}}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.upstream.Add(1)
		if r.URL.Path == "/slow" { // answers only once tpd gave up on it
			<-r.Context().Done()
			return
		}
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "path=%s host=%s xfp=%s xff=%s xfh=%s body=%d", r.URL.RequestURI(), r.Host,
			r.Header.Get("X-Forwarded-Proto"), r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Host"), len(body))
	}))
	t.Cleanup(up.Close)
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", up.Listener.Addr().String())
	}}
	t.Cleanup(tr.CloseIdleConnections)
	e.rt = tr
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("tpd log:\n%s", e.log.String())
		}
	})
	e.d = serveDaemon(t, allowAlice, func(c *config.Server) {
		c.SiteMaxBody = 1024
		c.SiteUpstreamTimeout = time.Second // /slow's deliberate wait
	}, slog.New(slog.NewTextHandler(e.log, nil)))
	e.d.setReverseHTTP(e.reg)
	_, e.port, _ = net.SplitHostPort(e.d.cfg.Listen)
	return e
}

func (e *revHTTPEnv) url(name, path string) string {
	return "https://" + net.JoinHostPort(name, e.port) + path
}

// A name held by a reverse HTTP tunnel is a website on the public port for as
// long as it is held: over HTTP/1.1, h2 and h3 a browser-style client (no
// client certificate) gets a certificate for the name (by ACME, see revhttp_cert_test.go) and the
// app's answer, which saw the client's Host and X-Forwarded-*; tpd logs the
// request like any site's. Bad inputs, each answered as for other upstream
// sites: a name nobody holds (TLS alert), a Host other than the connection's
// name (421), a body over site-max-body (413, never forwarded), an app that
// does not answer (504), a name whose tunnel went away (404 on the open
// connection, the alert on a new one), a devices-only name without a device
// certificate (403, never forwarded).
func TestReverseHTTPSite(t *testing.T) {
	t.Parallel()
	e := startRevHTTP(t)
	const app, other = "app.rev.tp.internal", "other.rev.tp.internal"
	e.reg.hold(app, testHeld{rt: e.rt})
	e.reg.hold(other, testHeld{rt: e.rt})
	sd := &siteDaemon{d: e.d, addr: e.d.cfg.Listen, root: rootPool(e.d)}

	for proto, c := range sd.clients(t) {
		resp, body := fetch(t, c, e.url(app, "/hello?x=1"))
		want := fmt.Sprintf("path=/hello?x=1 host=%s xfp=https xff=127.0.0.1 xfh=%s body=0", net.JoinHostPort(app, e.port), net.JoinHostPort(app, e.port))
		if resp.StatusCode != http.StatusOK || resp.Proto != proto || body != want {
			t.Errorf("%s GET %s: %s %s %q, want 200 %q", proto, app, resp.Proto, resp.Status, body, want)
			continue
		}
		if leaf := resp.TLS.PeerCertificates[0]; len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != app {
			t.Errorf("%s: the certificate for %s names %v", proto, app, leaf.DNSNames)
		}
	}
	if logs := e.log.String(); !strings.Contains(logs, `msg="http request" site=`+app) || !strings.Contains(logs, "status=200") {
		t.Errorf("no access-log line for %s:\n%s", app, logs)
	}

	// A name nobody holds: refused at the handshake, as an unknown site is.
	_, err := tls.Dial("tcp", e.d.cfg.Listen, &tls.Config{ServerName: "gone.rev.tp.internal", RootCAs: sd.root, NextProtos: []string{"http/1.1"}})
	if err == nil || !strings.Contains(err.Error(), "unrecognized name") {
		t.Errorf("handshake for a name nobody holds: %v, want the unrecognized_name alert", err)
	}

	// The 421 rule: a connection for app cannot serve other.
	misdirect := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			d := &tls.Dialer{Config: &tls.Config{ServerName: app, RootCAs: sd.root}}
			return d.DialContext(ctx, "tcp", e.d.cfg.Listen)
		}}}
	if resp, body := fetch(t, misdirect, e.url(other, "/")); resp.StatusCode != http.StatusMisdirectedRequest {
		t.Errorf("Host %s on a connection for %s: %s %q, want 421", other, app, resp.Status, body)
	}

	h1 := sd.clients(t)["HTTP/1.1"]
	seen := e.upstream.Load()
	resp, err := h1.Post(e.url(app, "/upload"), "application/octet-stream", bytes.NewReader(make([]byte, 2048)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge || e.upstream.Load() != seen {
		t.Errorf("a 2048-byte body with site-max-body 1024: %s, the app saw %d requests more; want 413 and none", resp.Status, e.upstream.Load()-seen)
	}
	if resp, body := fetch(t, h1, e.url(app, "/slow")); resp.StatusCode != http.StatusGatewayTimeout {
		t.Errorf("an app that does not answer: %s %q, want 504", resp.Status, body)
	}

	// The exposer chose devices only: a browser without a device certificate
	// is refused at the handshake and the app never sees the request.
	const private = "private.rev.tp.internal"
	e.reg.hold(private, testHeld{rt: e.rt, devicesOnly: true})
	seen = e.upstream.Load()
	if err := firstRead(e.d.cfg.Listen, &tls.Config{ServerName: private, RootCAs: sd.root, NextProtos: []string{"http/1.1"}}); err == nil ||
		!strings.Contains(err.Error(), "certificate required") || e.upstream.Load() != seen {
		t.Errorf("a devices-only name without a device certificate: %v, the app saw %d requests; want the certificate_required alert and none", err, e.upstream.Load()-seen)
	}
	// A public name's handshake never asks for a certificate.
	var asked bool
	c, err := tls.Dial("tcp", e.d.cfg.Listen, &tls.Config{ServerName: app, RootCAs: sd.root, NextProtos: []string{"h2", "http/1.1"},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			asked = true
			return &tls.Certificate{}, nil
		}})
	if err != nil {
		t.Fatalf("handshake for the public name %s: %v", app, err)
	}
	c.Close()
	if asked {
		t.Errorf("the handshake for the public name %s sent a CertificateRequest", app)
	}

	// The tunnel goes away: the open connection gets 404, a new one the alert.
	if resp, _ := fetch(t, h1, e.url(app, "/")); resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s before the drop: %s", app, resp.Status)
	}
	e.reg.drop(app)
	if resp, body := fetch(t, h1, e.url(app, "/")); resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET %s on an open connection after its tunnel went: %s %q, want 404", app, resp.Status, body)
	}
	_, err = tls.Dial("tcp", e.d.cfg.Listen, &tls.Config{ServerName: app, RootCAs: sd.root, NextProtos: []string{"http/1.1"}})
	if err == nil || !strings.Contains(err.Error(), "unrecognized name") {
		t.Errorf("new handshake for %s after its tunnel went: %v, want the unrecognized_name alert", app, err)
	}
}

// A devices-only name serves a request whose connection carried an accepted
// device certificate (alice's, from dlogin) and refuses one from another CA
// and one from a revoked device, and a scoped device's (expose:ci); the app
// sees only the accepted one. (The
// handshake that asks for the certificate is the proxy's part, see
// DevicesOnlyName; here the connection state is given as the handshake would
// leave it.)
func TestReverseHTTPDevicesOnly(t *testing.T) {
	t.Parallel()
	e := startRevHTTP(t)
	const private = "private.rev.tp.internal"
	e.reg.hold(private, testHeld{rt: e.rt, devicesOnly: true})
	if !e.d.DevicesOnlyName(private) || e.d.DevicesOnlyName("app.rev.tp.internal") {
		t.Fatal("DevicesOnlyName does not follow the registry")
	}
	alice, _, _ := enrollClient(t, e.d, e.d.cfg.PublicURL(), "alice", "laptop")
	cert, err := alice.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	stranger := testpki.New(t).ClientCert(t, "dev-x", testpki.LeafOptions{})
	bob, _, _ := enrollClient(t, e.d, e.d.cfg.PublicURL(), "bob", "phone")
	bobCert, err := bob.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.d.Users().RevokeDevice(bob.Profile.DeviceID); err != nil {
		t.Fatal(err)
	}
	// A scoped device (a CI job's credential) may keep its own name exposed,
	// never reach another app.
	ci, _, _ := enrollClient(t, e.d, e.d.cfg.PublicURL(), "alice", "ci")
	if err := e.d.Users().SetScope(ci.Profile.DeviceID, "expose:ci"); err != nil {
		t.Fatal(err)
	}
	ciCert, err := ci.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		what string
		leaf *x509.Certificate
		want int
	}{
		{"alice's device certificate", cert.Leaf, http.StatusOK},
		{"a certificate from another CA", stranger.Leaf, http.StatusForbidden},
		{"a revoked device's certificate", bobCert.Leaf, http.StatusForbidden},
		{"a scoped device's certificate", ciCert.Leaf, http.StatusForbidden},
	} {
		seen := e.upstream.Load()
		req := httptest.NewRequest(http.MethodGet, "https://"+private+"/", nil)
		req.TLS = &tls.ConnectionState{ServerName: private, PeerCertificates: []*x509.Certificate{tc.leaf}, HandshakeComplete: true}
		rec := httptest.NewRecorder()
		e.d.serveWeb(rec, req)
		forwarded := e.upstream.Load() - seen
		if rec.Code != tc.want || (tc.want == http.StatusOK) != (forwarded == 1) {
			t.Errorf("%s: %d %q, the app saw %d requests; want %d", tc.what, rec.Code, rec.Body, forwarded, tc.want)
		}
	}
}

// The handshake of a devices-only name asks for the device certificate (the
// proxy's DevicesOnly hook is tpd's DevicesOnlyName) over TCP (HTTP/1.1, h2)
// and QUIC (h3), and its requests reach the app through the website. Bad
// inputs: no certificate (the certificate_required alert), a certificate from
// another CA, a revoked device's certificate — each refused at the handshake,
// the app seeing nothing. The name turned public again asks for nothing.
func TestReverseHTTPDevicesOnlyHandshake(t *testing.T) {
	t.Parallel()
	e := startRevHTTP(t)
	const private = "private.rev.tp.internal"
	e.reg.hold(private, testHeld{rt: e.rt, devicesOnly: true})
	root := rootPool(e.d)
	alice, _, _ := enrollClient(t, e.d, e.d.cfg.PublicURL(), "alice", "laptop")
	cert, err := alice.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	stranger := testpki.New(t).ClientCert(t, "dev-x", testpki.LeafOptions{})
	bob, _, _ := enrollClient(t, e.d, e.d.cfg.PublicURL(), "bob", "phone")
	bobCert, err := bob.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.d.Users().RevokeDevice(bob.Profile.DeviceID); err != nil {
		t.Fatal(err)
	}
	clients := func(c *tls.Certificate) map[string]*http.Client {
		cfg := func() *tls.Config {
			tc := &tls.Config{RootCAs: root}
			if c != nil {
				tc.Certificates = []tls.Certificate{*c}
			}
			return tc
		}
		dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", e.d.cfg.Listen)
		}
		h1 := &http.Transport{DialContext: dial, TLSClientConfig: cfg()}
		h2 := &http.Transport{DialContext: dial, TLSClientConfig: cfg(), ForceAttemptHTTP2: true}
		h3 := &http3.Transport{TLSClientConfig: cfg(),
			Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, qc *quic.Config) (*quic.Conn, error) {
				return quic.DialAddr(ctx, e.d.cfg.Listen, tlsCfg, qc)
			}}
		t.Cleanup(func() { h1.CloseIdleConnections(); h2.CloseIdleConnections(); h3.Close() })
		return map[string]*http.Client{
			"HTTP/1.1": {Transport: h1, Timeout: 20 * time.Second},
			"HTTP/2.0": {Transport: h2, Timeout: 20 * time.Second},
			"HTTP/3.0": {Transport: h3, Timeout: 20 * time.Second},
		}
	}
	for proto, c := range clients(cert) {
		resp, body := fetch(t, c, e.url(private, "/x"))
		if resp.StatusCode != http.StatusOK || resp.Proto != proto || !strings.HasPrefix(body, "path=/x ") {
			t.Errorf("%s with alice's device certificate: %s %s %q, want 200 from the app", proto, resp.Proto, resp.Status, body)
		}
	}
	for _, tc := range []struct {
		what string
		cert *tls.Certificate
		want string // in the client's error; "" for any refusal
	}{
		{"no certificate", nil, "certificate required"},
		{"a certificate from another CA", &stranger, ""},
		{"a revoked device's certificate", bobCert, ""},
	} {
		seen := e.upstream.Load()
		cfg := &tls.Config{ServerName: private, RootCAs: root, NextProtos: []string{"h2", "http/1.1"}}
		if tc.cert != nil {
			cfg.Certificates = []tls.Certificate{*tc.cert}
		}
		if err := firstRead(e.d.cfg.Listen, cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("TCP with %s: %v; want a refused handshake (%q)", tc.what, err, tc.want)
		}
		resp, err := clients(tc.cert)["HTTP/3.0"].Get(e.url(private, "/"))
		if err == nil {
			resp.Body.Close()
			t.Errorf("h3 with %s: %s, want a refused handshake", tc.what, resp.Status)
		} else if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("h3 with %s: %v; want a refused handshake (%q)", tc.what, err, tc.want)
		}
		if e.upstream.Load() != seen {
			t.Errorf("with %s the app saw %d requests, want none", tc.what, e.upstream.Load()-seen)
		}
	}

	// The same name held for anyone: no CertificateRequest any more.
	e.reg.hold(private, testHeld{rt: e.rt})
	var asked bool
	c, err := tls.Dial("tcp", e.d.cfg.Listen, &tls.Config{ServerName: private, RootCAs: root, NextProtos: []string{"http/1.1"},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			asked = true
			return &tls.Certificate{}, nil
		}})
	if err != nil {
		t.Fatalf("handshake for %s held for anyone: %v", private, err)
	}
	c.Close()
	if asked {
		t.Errorf("%s held for anyone still sent a CertificateRequest", private)
	}
}

// firstRead handshakes with addr and reads once: in TLS 1.3 a server's refusal
// of the client certificate arrives on the client's first read. The client
// sends nothing after its Finished, so a reset never races the alert.
func firstRead(addr string, cfg *tls.Config) error {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 1))
	return err
}
