package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	_ "github.com/tp-proxy/tp/internal/lib/xconnect" // h2 extended CONNECT in net/http (RFC 8441)
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/policy"
	"github.com/tp-proxy/tp/proxy"
)

// The reverse-tunnel clients in these tests are written from the text of
// draft-kazuho-httpbis-reverse-tunnel-00 alone: raw HTTP/1.1 bytes for the
// Upgrade, raw h2 frames for extended CONNECT.

// rtDirectory knows every device, until one is revoked.
type rtDirectory struct {
	mu      sync.Mutex
	revoked map[string]bool
}

func (d *rtDirectory) Lookup(id string) ([]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.revoked[id] {
		return nil, fmt.Errorf("device %s: %w", id, authz.ErrRevoked)
	}
	return nil, nil
}

func (d *rtDirectory) revoke(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.revoked == nil {
		d.revoked = map[string]bool{}
	}
	d.revoked[id] = true
}

type rtEnv struct {
	ca      *testpki.CA
	srv     *proxy.Server
	addr    string // the proxy name's TLS endpoint
	pubPort int
	records chan proxy.SessionRecord // the audit trail (OnSessionEnd)
	dir     *rtDirectory
	alice   tls.Certificate
	bob     tls.Certificate
	carol   tls.Certificate
}

// newRTEnv starts a proxy.Server with a reverse zone and one public port, decided
// by the real default policy plus rules for alice (and bob, so that a refusal of
// bob is the registry's, not the policy's), and mounts ServeReverseTunnel on a
// TLS server on loopback that requires device certificates, h2 enabled.
func newRTEnv(t testing.TB) *rtEnv {
	t.Helper()
	return newRTEnvOpts(t, proxy.ReverseTunnelOptions{ListenWait: 20 * time.Second})
}

func newRTEnvOpts(t testing.TB, tunnels proxy.ReverseTunnelOptions) *rtEnv {
	t.Helper()
	ca := testpki.New(t)
	ln0, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pubPort := ln0.Addr().(*net.TCPAddr).Port
	_ = ln0.Close()

	dir := t.TempDir()
	if err := policy.WriteDefault(dir); err != nil {
		t.Fatal(err)
	}
	rules := fmt.Sprintf(`package tp.authz

allow if {
	input.action == "expose_http"
	input.identity.user in {"alice", "bob"}
	input.destination.reverse == "blog"
}

allow if {
	input.action == "expose_public"
	input.identity.user in {"alice", "bob"}
	input.destination.port == %d
}
`, pubPort)
	if err := os.WriteFile(filepath.Join(dir, "revtunnel.rego"), []byte(rules), 0o600); err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Load(context.Background(), dir, policy.WithTimeout(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	dir2 := &rtDirectory{}
	az := &policy.Authorizer{Directory: dir2, Evaluator: eng}
	serverCert := ca.ServerCert(t, "proxy.localhost")
	records := make(chan proxy.SessionRecord, 1000)
	srv, err := proxy.New(proxy.Config{
		OnSessionEnd: func(r proxy.SessionRecord) {
			select {
			case records <- r:
			default:
			}
		},
		ProxyTLS: &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientCAs: ca.Pool, ClientAuth: tls.RequireAndVerifyClientCert},
		Identify: func(cs tls.ConnectionState) (authz.Identity, error) {
			return az.Verify(cs.PeerCertificates[0])
		},
		Authorizer: az,
		Logger:     discardLogger(),
		Reverse: proxy.ReverseOptions{
			Zone:        "rev.test",
			PublicPorts: func(network string, port int) bool { return network == "tcp" && port == pubPort },
			PublicHost:  "127.0.0.1",
			HTTPTunnels: tunnels,
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{
		Handler: http.HandlerFunc(srv.ServeReverseTunnel),
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{serverCert}, ClientCAs: ca.Pool, ClientAuth: tls.RequireAndVerifyClientCert,
			MinVersion: tls.VersionTLS13, NextProtos: []string{"h2", "http/1.1"},
		},
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          nil,
	}
	go func() { _ = hs.ServeTLS(ln, "", "") }()
	t.Cleanup(func() {
		_ = hs.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	})
	return &rtEnv{ca: ca, srv: srv, addr: ln.Addr().String(), pubPort: pubPort, records: records, dir: dir2,
		alice: ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{}),
		bob:   ca.ClientCert(t, "bob@desk", testpki.LeafOptions{}),
		carol: ca.ClientCert(t, "carol@phone", testpki.LeafOptions{})}
}

func (e *rtEnv) dialTLS(t *testing.T, cert tls.Certificate, alpn string) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", e.addr, &tls.Config{RootCAs: e.ca.Pool, ServerName: "proxy.localhost",
		Certificates: []tls.Certificate{cert}, NextProtos: []string{alpn}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if got := c.ConnectionState().NegotiatedProtocol; got != alpn {
		t.Fatalf("negotiated %q, want %q", got, alpn)
	}
	return c
}

// rtBufConn reads what the response parser buffered first.
type rtBufConn struct {
	*tls.Conn
	br *bufio.Reader
}

func (c *rtBufConn) Read(p []byte) (int, error) { return c.br.Read(p) }

// upgradeH1 sends the draft's HTTP/1.1 tunnel request and returns the final
// response (after any 100 Continue) and the tunnel.
func (e *rtEnv) upgradeH1(t *testing.T, cert tls.Certificate, path, alpnField string) (*http.Response, *rtBufConn) {
	t.Helper()
	c := e.dialTLS(t, cert, "http/1.1")
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	req := "GET " + path + " HTTP/1.1\r\nHost: proxy.localhost\r\nConnection: upgrade\r\nUpgrade: reverse\r\n"
	if alpnField != "" {
		req += "ALPN: " + alpnField + "\r\n"
	}
	if _, err := io.WriteString(c, req+"\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("reading the tunnel response: %v", err)
		}
		if resp.StatusCode == http.StatusContinue {
			continue
		}
		_ = c.SetDeadline(time.Time{})
		return resp, &rtBufConn{Conn: c, br: br}
	}
}

// rtApp is the HTTP app behind the tunnels.
func rtApp(t *testing.T, cut chan<- struct{}) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprintf(w, "hello %s over %s", r.Host, r.Proto)
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1048576")
		_, _ = w.Write(bytes.Repeat([]byte("x"), 64<<10))
		http.NewResponseController(w).Flush()
		cut <- struct{}{}
		<-r.Context().Done()
	})
	return mux
}

// rtServeApp serves the app on the tunnel: HTTP/1.1 or h2 as Selected-ALPN said.
func rtServeApp(t *testing.T, conn net.Conn, inside string, h http.Handler) {
	t.Helper()
	if inside == "h2" {
		go (&http2.Server{}).ServeConn(conn, &http2.ServeConnOpts{Handler: h})
		return
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(&rtOneConn{c: conn}) }()
	t.Cleanup(func() { _ = srv.Close() })
}

// rtOneConn is a listener that yields one connection.
type rtOneConn struct {
	mu   sync.Mutex
	c    net.Conn
	done chan struct{}
}

func (l *rtOneConn) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.done == nil {
		l.done = make(chan struct{})
	}
	c, done := l.c, l.done
	l.c = nil
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-done
	return nil, net.ErrClosed
}

func (l *rtOneConn) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done == nil {
		l.done = make(chan struct{})
	}
	select {
	case <-l.done:
	default:
		close(l.done)
	}
	return nil
}

func (l *rtOneConn) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// get sends GET path to the reverse name through ReverseHTTP.
func (e *rtEnv) get(t *testing.T, path string) (string, error) {
	t.Helper()
	rt, ok := e.srv.ReverseHTTP("blog.rev.test")
	if !ok {
		t.Fatal("ReverseHTTP: no tunnel holds blog.rev.test")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://blog.rev.test"+path, nil)
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// A request for a name whose last tunnel has just closed waits for the next
// holder, and goes to it only if it serves the name to the same people: the
// same device coming back with TP-Access: devices does not get a request let
// in for anyone (fail closed); coming back as it was, it gets the request.
func TestReverseHTTPNextHolderKeepsAccess(t *testing.T) {
	t.Parallel()
	// Idle tunnels close after 200 ms (and exposers reopen them): a stopped
	// exposer's tunnel is noticed then.
	e := newRTEnvOpts(t, proxy.ReverseTunnelOptions{IdleTimeout: 200 * time.Millisecond})
	local := httptest.NewServer(rtApp(t, nil))
	t.Cleanup(local.Close)
	u, _ := url.Parse(local.URL)
	expose := func(devicesOnly bool) (stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		x := &clients.HTTPExposer{Server: e.addr, ProxyName: "proxy.localhost",
			TLSConfig: &tls.Config{RootCAs: e.ca.Pool, Certificates: []tls.Certificate{e.alice}},
			Name:      "blog", Local: u, Tunnels: 1, H1Only: true, DevicesOnly: devicesOnly, Logger: discardLogger()}
		done := make(chan error, 1)
		go func() { done <- x.Run(ctx) }()
		return func() { cancel(); <-done }
	}
	// gone stops the exposer and waits until its holder has ended; the name
	// is still offered (requests wait for the next holder).
	gone := func(stop func()) http.RoundTripper {
		t.Helper()
		stop()
		waitFor(t, func() bool { return !e.srv.ReverseHeld("blog.rev.test") })
		rt, ok := e.srv.ReverseHTTP("blog.rev.test")
		if !ok {
			t.Fatal("ReverseHTTP refused the name the moment its last tunnel closed; want requests to wait for the next")
		}
		return rt
	}
	send := func(rt http.RoundTripper) chan error {
		errc := make(chan error, 1)
		go func() {
			req, _ := http.NewRequest(http.MethodGet, "https://blog.rev.test/hello", nil)
			resp, err := rt.RoundTrip(req)
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if string(b) != "hello blog.rev.test over HTTP/1.1" {
					err = fmt.Errorf("body %q", b)
				}
			}
			errc <- err
		}()
		return errc
	}

	// A round-tripper made while the name was open to anyone does not send
	// to a devices-only holder that took over before the request went.
	stop := expose(false)
	waitFor(t, func() bool { return e.srv.ReverseHeld("blog.rev.test") })
	early, ok := e.srv.ReverseHTTP("blog.rev.test")
	if !ok || early.(interface{ DevicesOnly() bool }).DevicesOnly() {
		t.Fatal("the name, held by tunnels open to anyone, is not offered as open to anyone")
	}
	gone(stop)
	stop = expose(true)
	waitFor(t, func() bool { return e.srv.ReverseHeld("blog.rev.test") })
	if err := <-send(early); err == nil || !strings.Contains(err.Error(), "with other access") {
		t.Fatalf("a request checked as for anyone, sent after a devices-only holder took the name: %v; want it refused", err)
	}
	gone(stop)

	stop = expose(false)
	waitFor(t, func() bool { return e.srv.ReverseHeld("blog.rev.test") })
	waited := send(gone(stop))
	stop = expose(true) // the same device, now for enrolled devices only
	if err := <-waited; err == nil || !strings.Contains(err.Error(), "with other access") {
		t.Fatalf("a request let in for anyone, sent to the name's devices-only holder: %v; want it refused", err)
	}
	if !e.srv.ReverseHTTPDevicesOnly("blog.rev.test") {
		t.Fatal("the devices-only holder does not say so")
	}

	waited = send(gone(stop))
	if !e.srv.ReverseHTTPDevicesOnly("blog.rev.test") {
		t.Fatal("between a devices-only holder and the next, the name is not devices-only")
	}
	stop = expose(true)
	defer stop()
	if err := <-waited; err != nil {
		t.Fatalf("a request that waited for the same device's next tunnel, with the same access: %v", err)
	}
}

func TestReverseTunnelHTTP1Upgrade(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	for _, tc := range []struct{ offer, selected, inside string }{
		{"http%2F1.1", "http%2F1.1", "http/1.1"},
		{"h2, http%2F1.1", "h2", "h2"},
		{"", "", "http/1.1"}, // no ALPN field: no Selected-ALPN (the draft's MUST NOT), HTTP/1.1 inside
	} {
		t.Run("alpn="+tc.offer, func(t *testing.T) {
			resp, conn := e.upgradeH1(t, e.alice, "/.well-known/tp/reverse-http/blog", tc.offer)
			if resp.StatusCode != http.StatusSwitchingProtocols || !strings.EqualFold(resp.Header.Get("Upgrade"), "reverse") {
				t.Fatalf("tunnel request with ALPN %q: got %s, Upgrade %q; want 101 and Upgrade: reverse", tc.offer, resp.Status, resp.Header.Get("Upgrade"))
			}
			if got := resp.Header.Get("Selected-ALPN"); got != tc.selected {
				t.Fatalf("ALPN %q: Selected-ALPN = %q, want %q", tc.offer, got, tc.selected)
			}
			rtServeApp(t, conn, tc.inside, rtApp(t, nil))
			want := "hello blog.rev.test over HTTP/1.1"
			if tc.inside == "h2" {
				want = "hello blog.rev.test over HTTP/2.0"
			}
			var wg sync.WaitGroup
			errs := make(chan error, 4)
			for range 4 { // over h2 these share the one tunnel; over HTTP/1.1 they queue for it
				wg.Add(1)
				go func() {
					defer wg.Done()
					got, err := e.get(t, "/hello")
					if err == nil && got != want {
						err = fmt.Errorf("body %q, want %q", got, want)
					}
					errs <- err
				}()
			}
			if e.srv.ReverseHTTPDevicesOnly("blog.rev.test") {
				t.Error("a tunnel without TP-Access made the name devices-only")
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			_ = conn.Close()
		})
	}
}

// rtH2Client is the draft's tunnel over h2 from raw frames: one extended CONNECT
// stream as a net.Conn.
type rtH2Client struct {
	*tls.Conn
	fr   *http2.Framer
	wmu  sync.Mutex
	pr   *io.PipeReader
	pw   *io.PipeWriter
	resp []hpack.HeaderField
	// continues counts the 100 (Continue) responses before resp.
	continues int
}

func (e *rtEnv) extendedConnect(t *testing.T, cert tls.Certificate, path, alpnField string) *rtH2Client {
	t.Helper()
	c := e.dialTLS(t, cert, "h2")
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	tun := &rtH2Client{Conn: c, fr: http2.NewFramer(c, c)}
	tun.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := tun.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	// RFC 8441 section 3: a client must not send :protocol before the server's
	// SETTINGS_ENABLE_CONNECT_PROTOCOL = 1.
	for {
		f, err := tun.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		sf, ok := f.(*http2.SettingsFrame)
		if !ok || sf.IsAck() {
			continue
		}
		if v, _ := sf.Value(http2.SettingEnableConnectProtocol); v != 1 {
			t.Fatalf("the proxy name's h2 server sent SETTINGS_ENABLE_CONNECT_PROTOCOL = %d; extended CONNECT needs 1", v)
		}
		if err := tun.fr.WriteSettingsAck(); err != nil {
			t.Fatal(err)
		}
		break
	}
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	fields := []hpack.HeaderField{{Name: ":method", Value: "CONNECT"}, {Name: ":protocol", Value: "reverse"},
		{Name: ":scheme", Value: "https"}, {Name: ":path", Value: path}, {Name: ":authority", Value: "proxy.localhost"}}
	if alpnField != "" {
		fields = append(fields, hpack.HeaderField{Name: "alpn", Value: alpnField})
	}
	for _, f := range fields {
		_ = enc.WriteField(f)
	}
	if err := tun.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	for tun.resp == nil {
		f, err := tun.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if f.PseudoValue("status") != "100" {
				tun.resp = f.Fields
			} else {
				tun.continues++
			}
		case *http2.RSTStreamFrame:
			t.Fatalf("extended CONNECT reset: %v", f.ErrCode)
		}
	}
	_ = c.SetDeadline(time.Time{})
	tun.pr, tun.pw = io.Pipe()
	go tun.readLoop()
	return tun
}

func (h *rtH2Client) field(name string) string {
	for _, f := range h.resp {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

func (h *rtH2Client) readLoop() {
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			h.pw.CloseWithError(err)
			return
		}
		switch f := f.(type) {
		case *http2.DataFrame:
			if n := len(f.Data()); n > 0 {
				if _, err := h.pw.Write(f.Data()); err != nil {
					return
				}
				h.wmu.Lock()
				_ = h.fr.WriteWindowUpdate(0, uint32(n))
				_ = h.fr.WriteWindowUpdate(1, uint32(n))
				h.wmu.Unlock()
			}
			if f.StreamEnded() {
				h.pw.Close()
			}
		case *http2.RSTStreamFrame:
			h.pw.CloseWithError(fmt.Errorf("stream reset: %v", f.ErrCode))
		case *http2.PingFrame:
			if !f.IsAck() {
				h.wmu.Lock()
				_ = h.fr.WritePing(true, f.Data)
				h.wmu.Unlock()
			}
		case *http2.SettingsFrame:
			if !f.IsAck() {
				h.wmu.Lock()
				_ = h.fr.WriteSettingsAck()
				h.wmu.Unlock()
			}
		}
	}
}

func (h *rtH2Client) Read(p []byte) (int, error) { return h.pr.Read(p) }

func (h *rtH2Client) Write(p []byte) (int, error) {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), 16384)]
		if err := h.fr.WriteData(1, false, chunk); err != nil {
			return n, err
		}
		n += len(chunk)
		p = p[len(chunk):]
	}
	return n, nil
}

func TestReverseTunnelExtendedConnectH2(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	tun := e.extendedConnect(t, e.alice, "/.well-known/tp/reverse-http/blog", "http%2F1.1")
	if st := tun.field(":status"); st != "200" {
		t.Fatalf("extended CONNECT :protocol reverse: status %s, want 200", st)
	}
	if got := tun.field("selected-alpn"); got != "http%2F1.1" {
		t.Fatalf("selected-alpn = %q, want http%%2F1.1", got)
	}
	rtServeApp(t, tun, "http/1.1", rtApp(t, nil))
	got, err := e.get(t, "/hello")
	if err != nil || got != "hello blog.rev.test over HTTP/1.1" {
		t.Fatalf("GET through the h2 tunnel: %q, %v", got, err)
	}
}

func TestReverseTunnelRefusals(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	resp, conn := e.upgradeH1(t, e.alice, "/.well-known/tp/reverse-http/blog", "http%2F1.1")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("alice: %s", resp.Status)
	}
	rtServeApp(t, conn, "http/1.1", rtApp(t, nil))

	for _, tc := range []struct {
		name   string
		cert   tls.Certificate
		path   string
		status int
		reason string
	}{
		{"another identity takes the name", e.bob, "/.well-known/tp/reverse-http/blog", 403, "another identity"},
		{"the policy refuses", e.carol, "/.well-known/tp/reverse-http/blog", 403, "no policy rule allows carol@phone"},
		{"a name the policy does not allow", e.alice, "/.well-known/tp/reverse-http/wiki", 403, "no policy rule allows alice@laptop"},
		{"a port outside public-ports", e.alice, "/.well-known/listen-tcp/0.0.0.0/1/", 403, "public-ports"},
		{"a bad label", e.alice, "/.well-known/tp/reverse-http/a.b", 400, "no reverse name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, _ := e.upgradeH1(t, tc.cert, tc.path, "")
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			if resp.StatusCode != tc.status || !strings.Contains(string(body), tc.reason) {
				t.Fatalf("%s: got %s %q; want %d with %q", tc.path, resp.Status, body, tc.status, tc.reason)
			}
		})
	}
	// The holder still serves.
	if got, err := e.get(t, "/hello"); err != nil || !strings.HasPrefix(got, "hello") {
		t.Fatalf("alice's tunnel after the refusals: %q, %v", got, err)
	}
	// The policy's refusal of carol is in the audit trail, with the revision that decided.
	for {
		select {
		case r := <-e.records:
			if r.Identity != "carol@phone" {
				continue
			}
			if r.Action != "expose_http" || r.Decision != "deny" || r.PolicyRevision == "" || r.EndCode != "policy_denied" {
				t.Fatalf("carol's audit record: %+v; want action expose_http, decision deny, a policy revision, end_code policy_denied", r)
			}
			return
		case <-time.After(10 * time.Second):
			t.Fatal("no audit record for carol's refused tunnel")
		}
	}
}

func TestReverseTunnelCutMidResponse(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	resp, conn := e.upgradeH1(t, e.alice, "/.well-known/tp/reverse-http/blog", "http%2F1.1")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("alice: %s", resp.Status)
	}
	cut := make(chan struct{}, 1)
	rtServeApp(t, conn, "http/1.1", rtApp(t, cut))
	go func() {
		<-cut // the app sent 64 KiB of 1 MiB: cut the tunnel
		_ = conn.NetConn().(*net.TCPConn).SetLinger(0)
		_ = conn.NetConn().Close()
	}()
	got, err := e.get(t, "/big")
	if err == nil {
		t.Fatalf("a tunnel cut after %d of 1048576 bytes read as a complete body", len(got))
	}
	t.Logf("the cut surfaced as: %v", err)
	if len(got) >= 1<<20 {
		t.Fatalf("read %d bytes", len(got))
	}
}

// The same cut on an h2 extended CONNECT tunnel: the app's side resets the
// stream (RST_STREAM) after 64 KiB of 1 MiB.
func TestReverseTunnelCutMidResponseH2(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	tun := e.extendedConnect(t, e.alice, "/.well-known/tp/reverse-http/blog", "http%2F1.1")
	if st := tun.field(":status"); st != "200" {
		t.Fatalf("status %s", st)
	}
	cut := make(chan struct{}, 1)
	rtServeApp(t, tun, "http/1.1", rtApp(t, cut))
	go func() {
		<-cut
		tun.wmu.Lock()
		_ = tun.fr.WriteRSTStream(1, http2.ErrCodeCancel)
		tun.wmu.Unlock()
	}()
	got, err := e.get(t, "/big")
	if err == nil {
		t.Fatalf("a tunnel reset after %d of 1048576 bytes read as a complete body", len(got))
	}
	t.Logf("the reset surfaced as: %v", err)
}

// Bounds: a third tunnel for a name that allows two is refused with 429.
func TestReverseTunnelPerNameBound(t *testing.T) {
	t.Parallel()
	e := newRTEnvOpts(t, proxy.ReverseTunnelOptions{MaxPerName: 2})
	for i := range 2 {
		if resp, _ := e.upgradeH1(t, e.alice, "/.well-known/tp/reverse-http/blog", ""); resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("tunnel %d: %s", i+1, resp.Status)
		}
	}
	resp, _ := e.upgradeH1(t, e.alice, "/.well-known/tp/reverse-http/blog", "")
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(body), "as many as this server allows per name") {
		t.Fatalf("a third tunnel over MaxPerName 2: %s %q; want 429", resp.Status, body)
	}
}

// A device that is revoked loses its tunnels at the next re-check, and
// cannot open new ones.
func TestReverseTunnelRevoked(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	resp, conn := e.upgradeH1(t, e.alice, "/.well-known/tp/reverse-http/blog", "")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("%s", resp.Status)
	}
	e.dir.revoke("alice@laptop")
	if _, closed := e.srv.Recheck(context.Background()); closed != 1 {
		t.Fatalf("Recheck after revoking alice@laptop closed %d sessions; want her one tunnel", closed)
	}
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the revoked device's tunnel was not closed: %v", err)
	}
	resp, _ = e.upgradeH1(t, e.alice, "/.well-known/tp/reverse-http/blog", "")
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "revoked") {
		t.Fatalf("a revoked device's new tunnel: %s %q; want 403 saying revoked", resp.Status, body)
	}
}

// Per device: a second tunnel over MaxPerIdentity 1 is refused with 429.
func TestReverseTunnelPerIdentityBound(t *testing.T) {
	t.Parallel()
	e := newRTEnvOpts(t, proxy.ReverseTunnelOptions{MaxPerIdentity: 1})
	if resp, _ := e.upgradeH1(t, e.alice, "/.well-known/tp/reverse-http/blog", ""); resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("first tunnel: %s", resp.Status)
	}
	resp, _ := e.upgradeH1(t, e.alice, fmt.Sprintf("/.well-known/listen-tcp/0.0.0.0/%d/", e.pubPort), "")
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(body), "per device") {
		t.Fatalf("a second tunnel over MaxPerIdentity 1: %s %q; want 429", resp.Status, body)
	}
}

// An HTTP/1.1 tunnel nobody uses is closed after IdleTimeout; the app sees EOF.
func TestReverseTunnelIdleTimeout(t *testing.T) {
	t.Parallel()
	e := newRTEnvOpts(t, proxy.ReverseTunnelOptions{IdleTimeout: 200 * time.Millisecond})
	resp, conn := e.upgradeH1(t, e.alice, "/.well-known/tp/reverse-http/blog", "")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("%s", resp.Status)
	}
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if n, err := conn.Read(make([]byte, 1)); err == nil {
		t.Fatalf("an idle tunnel received %d bytes instead of being closed", n)
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("an idle tunnel was still open after 30s (IdleTimeout 200ms)")
	}
}

func TestReverseTunnelListenTCPAccept(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	path := fmt.Sprintf("/.well-known/listen-tcp/127.0.0.1/%d/", e.pubPort)
	type result struct {
		resp *http.Response
		conn *rtBufConn
	}
	got := make(chan result, 1)
	go func() { // the relay's tunnel request waits (100 Continue) for a connection
		resp, conn := e.upgradeH1(t, e.alice, path, "")
		got <- result{resp, conn}
	}()
	// The public port opens when the tunnel request is accepted: poll for it.
	pub := fmt.Sprintf("127.0.0.1:%d", e.pubPort)
	var c net.Conn
	deadline := time.Now().Add(20 * time.Second)
	for {
		var err error
		if c, err = net.DialTimeout("tcp", pub, time.Second); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the public port %s never opened: %v", pub, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer c.Close()
	var r result
	select {
	case r = <-got:
	case <-time.After(30 * time.Second):
		t.Fatal("the tunnel request was never answered after a connection arrived")
	}
	if r.resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("listen-tcp: %s", r.resp.Status)
	}
	fwd := r.resp.Header.Get("Forwarded")
	if !strings.Contains(fwd, "for=\""+c.LocalAddr().String()+"\"") || !strings.Contains(fwd, "by=") {
		t.Fatalf("Forwarded = %q; want for=\"%s\" and by=", fwd, c.LocalAddr())
	}
	go func() { // the relayed service: an echo
		_, _ = io.Copy(r.conn, r.conn)
		_ = r.conn.CloseWrite()
	}()
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	go func() {
		_, _ = c.Write(payload)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	back, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("echo through listen-tcp: %v after %d bytes", err, len(back))
	}
	if sha256.Sum256(back) != sha256.Sum256(payload) {
		t.Fatalf("echo through listen-tcp: %d bytes back of %d, checksums differ", len(back), len(payload))
	}

	// Another identity cannot take the port while alice holds it.
	resp, _ := e.upgradeH1(t, e.bob, path, "")
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "another identity") {
		t.Fatalf("bob asking for alice's port: %s %q; want 403 naming another identity", resp.Status, body)
	}
}

// listenTCPPublic dials the public port, polling until the listen-tcp holder opened it.
func (e *rtEnv) dialPublic(t *testing.T) net.Conn {
	t.Helper()
	pub := fmt.Sprintf("127.0.0.1:%d", e.pubPort)
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", pub, time.Second)
		if err == nil {
			t.Cleanup(func() { _ = c.Close() })
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("the public port %s never opened: %v", pub, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// rtEchoChecksum sends 1 MiB of random bytes through c, half-closes, and checks
// that the same bytes come back.
func rtEchoChecksum(t *testing.T, c net.Conn) {
	t.Helper()
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	go func() {
		_, _ = c.Write(payload)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	back, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("echo: %v after %d bytes", err, len(back))
	}
	if sha256.Sum256(back) != sha256.Sum256(payload) {
		t.Fatalf("echo: %d bytes back of %d, checksums differ", len(back), len(payload))
	}
}

// A listen-tcp tunnel request that no connection matches hears 100 (Continue)
// while it waits, then 204 (No Content) (draft section 6.1).
func TestReverseTunnelListenTCPNoConnection(t *testing.T) {
	t.Parallel()
	e := newRTEnvOpts(t, proxy.ReverseTunnelOptions{ListenWait: 2 * time.Second})
	c := e.dialTLS(t, e.alice, "http/1.1")
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	req := fmt.Sprintf("GET /.well-known/listen-tcp/0.0.0.0/%d/ HTTP/1.1\r\nHost: proxy.localhost\r\nConnection: upgrade\r\nUpgrade: reverse\r\n\r\n", e.pubPort)
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	continues := 0
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("after %d 100 (Continue): %v", continues, err)
		}
		if resp.StatusCode == http.StatusContinue {
			continues++
			continue
		}
		if resp.StatusCode != http.StatusNoContent || continues == 0 {
			t.Fatalf("a listen-tcp request nobody connected to: %d × 100, then %s; want 100s, then 204", continues, resp.Status)
		}
		break
	}
	// The same over h2: 100 HEADERS, then a final 204.
	tun := e.extendedConnect(t, e.alice, fmt.Sprintf("/.well-known/listen-tcp/0.0.0.0/%d/", e.pubPort), "")
	if st := tun.field(":status"); st != "204" || tun.continues == 0 {
		t.Fatalf("over h2: %d × 100, then %s; want 100s, then 204", tun.continues, st)
	}
}

// Accept semantics over h2 extended CONNECT: 100 (Continue) frames while it
// waits, then 200 with Forwarded, then the connection's bytes as DATA. (No
// half-close here: docs/HTTP.md §4.)
func TestReverseTunnelListenTCPAcceptH2(t *testing.T) {
	t.Parallel()
	e := newRTEnvOpts(t, proxy.ReverseTunnelOptions{ListenWait: 20 * time.Second})
	path := fmt.Sprintf("/.well-known/listen-tcp/0.0.0.0/%d/", e.pubPort)
	got := make(chan *rtH2Client, 1)
	go func() { got <- e.extendedConnect(t, e.alice, path, "") }()
	c := e.dialPublic(t)
	var tun *rtH2Client
	select {
	case tun = <-got:
	case <-time.After(30 * time.Second):
		t.Fatal("the h2 tunnel request was never answered after a connection arrived")
	}
	if st, fwd := tun.field(":status"), tun.field("forwarded"); st != "200" || !strings.Contains(fwd, c.LocalAddr().String()) {
		t.Fatalf("listen-tcp over h2: status %s, forwarded %q; want 200 naming %s", st, fwd, c.LocalAddr())
	}
	go func() { _, _ = io.Copy(tun, tun) }()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	msg := []byte("HELO relay.example\r\n")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, len(msg))
	if _, err := io.ReadFull(c, back); err != nil || !bytes.Equal(back, msg) {
		t.Fatalf("echo over the h2 accept tunnel: %q, %v", back, err)
	}
}

// Bind semantics (the slides' alternative to accept): the tunnel chose h2, and
// TP sends a CONNECT on it for each connection to the public port.
func TestReverseTunnelListenTCPBind(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	path := fmt.Sprintf("/.well-known/listen-tcp/0.0.0.0/%d/", e.pubPort)
	resp, conn := e.upgradeH1(t, e.alice, path, "h2")
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Selected-ALPN") != "h2" {
		t.Fatalf("listen-tcp with ALPN h2: %s, Selected-ALPN %q; want 101 and h2", resp.Status, resp.Header.Get("Selected-ALPN"))
	}
	connects := make(chan string, 4)
	go (&http2.Server{}).ServeConn(conn, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect {
			http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
			return
		}
		connects <- r.Header.Get("Forwarded")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		_ = rc.Flush()
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
				_ = rc.Flush()
			}
			if err != nil {
				return
			}
		}
	})})
	for range 2 { // two connections, two CONNECT streams on the one tunnel
		c := e.dialPublic(t)
		rtEchoChecksum(t, c)
		if fwd := <-connects; !strings.Contains(fwd, "for=\""+c.LocalAddr().String()+"\"") {
			t.Fatalf("CONNECT's Forwarded = %q; want for=\"%s\"", fwd, c.LocalAddr())
		}
	}
}

// tp expose --http: TP's own client holds the name and passes requests to a
// local app, with h2 and with HTTP/1.1 inside.
func TestExposeHTTPClient(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	local := httptest.NewServer(rtApp(t, nil))
	t.Cleanup(local.Close)
	u, _ := url.Parse(local.URL)
	for _, h1 := range []bool{false, true} {
		t.Run(fmt.Sprintf("http1=%v", h1), func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			ready := make(chan string, 8)
			x := &clients.HTTPExposer{Server: e.addr, ProxyName: "proxy.localhost",
				TLSConfig: &tls.Config{RootCAs: e.ca.Pool, Certificates: []tls.Certificate{e.alice}},
				Name:      "blog", Local: u, Tunnels: 2, H1Only: h1, Logger: discardLogger(),
				Established: func(s string) { ready <- s }}
			done := make(chan error, 1)
			go func() { done <- x.Run(ctx) }()
			defer func() { cancel(); <-done }()
			want := "h2"
			if h1 {
				want = "http/1.1"
				// The h2 exposer of the subtest before has gone, but the
				// server may not have noticed its tunnels end yet: a request
				// sent down one of them fails without reaching the app.
				for deadline := time.Now().Add(20 * time.Second); e.srv.H2TunnelsOf("blog.rev.test") > 0; time.Sleep(10 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatalf("the server still holds %d h2 tunnels of an exposer that stopped 20s ago", e.srv.H2TunnelsOf("blog.rev.test"))
					}
				}
			}
			if got := <-ready; got != want {
				t.Fatalf("the server chose %q inside; want %q", got, want)
			}
			for range 3 { // HTTP/1.1: each request uses up a tunnel; the client replaces it
				got, err := e.get(t, "/hello")
				if err != nil || got != "hello blog.rev.test over HTTP/1.1" {
					t.Fatalf("GET through tp expose --http: %q, %v", got, err)
				}
			}
		})
	}
	t.Run("reopens", func(t *testing.T) {
		// TP closes tunnels idle for 200ms; the client reopens each one.
		e := newRTEnvOpts(t, proxy.ReverseTunnelOptions{IdleTimeout: 200 * time.Millisecond})
		ctx, cancel := context.WithCancel(context.Background())
		var mu sync.Mutex
		opened := 0
		x := &clients.HTTPExposer{Server: e.addr, ProxyName: "proxy.localhost",
			TLSConfig: &tls.Config{RootCAs: e.ca.Pool, Certificates: []tls.Certificate{e.alice}},
			Name:      "blog", Local: u, Tunnels: 1, H1Only: true, Logger: discardLogger(),
			Established: func(string) { mu.Lock(); opened++; mu.Unlock() }}
		done := make(chan error, 1)
		go func() { done <- x.Run(ctx) }()
		defer func() { cancel(); <-done }()
		deadline := time.Now().Add(30 * time.Second)
		for {
			mu.Lock()
			n := opened
			mu.Unlock()
			if n >= 3 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("tp expose --http opened %d tunnels in 30s while TP closed each after 200ms idle; want it to reopen them", n)
			}
			time.Sleep(20 * time.Millisecond)
		}
		// Between a close and its reopening nobody holds the name (one tunnel,
		// closed every 200 ms idle): the GET goes when a tunnel holds it.
		waitFor(t, func() bool { _, held := e.srv.ReverseHTTP("blog.rev.test"); return held })
		if got, err := e.get(t, "/hello"); err != nil || got != "hello blog.rev.test over HTTP/1.1" {
			t.Fatalf("GET after the tunnels were reopened: %q, %v", got, err)
		}
		// Requests that arrive as the only tunnel closes idle (every 200 ms
		// here) wait for the one the exposer opens next: none fails. The
		// sleeps are the point: they send each request about when the tunnel
		// the one before used closes idle.
		for i := range 20 {
			time.Sleep(200*time.Millisecond + time.Duration(i%5)*5*time.Millisecond)
			if got, err := e.get(t, "/hello"); err != nil || got != "hello blog.rev.test over HTTP/1.1" {
				t.Fatalf("GET %d, 200 ms after the one before, while the tunnel closes and reopens: %q, %v", i, got, err)
			}
		}
	})
	t.Run("refused", func(t *testing.T) {
		x := &clients.HTTPExposer{Server: e.addr, ProxyName: "proxy.localhost",
			TLSConfig: &tls.Config{RootCAs: e.ca.Pool, Certificates: []tls.Certificate{e.carol}},
			Name:      "blog", Local: u, Tunnels: 1, ExitOnRefusal: true, Logger: discardLogger()}
		err := x.Run(context.Background())
		if !errors.Is(err, clients.ErrTunnelRefused) || !strings.Contains(err.Error(), "no policy rule allows carol@phone") {
			t.Fatalf("carol's tp expose --http: %v; want the policy's refusal", err)
		}
	})
}

// TP-Access: devices makes the name devices-only (tpd's website then requires a
// device certificate); every tunnel of a name must ask for the same access.
func TestReverseTunnelDevicesOnly(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	local := httptest.NewServer(rtApp(t, nil))
	t.Cleanup(local.Close)
	u, _ := url.Parse(local.URL)
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 8)
	x := &clients.HTTPExposer{Server: e.addr, ProxyName: "proxy.localhost",
		TLSConfig: &tls.Config{RootCAs: e.ca.Pool, Certificates: []tls.Certificate{e.alice}},
		Name:      "blog", Local: u, Tunnels: 1, DevicesOnly: true, Logger: discardLogger(),
		Established: func(s string) { ready <- s }}
	done := make(chan error, 1)
	go func() { done <- x.Run(ctx) }()
	defer func() { cancel(); <-done }()
	<-ready
	if !e.srv.ReverseHTTPDevicesOnly("blog.rev.test:443") {
		t.Fatal("tp expose --http --devices-only: ReverseHTTPDevicesOnly(blog.rev.test) = false")
	}
	if got, err := e.get(t, "/hello"); err != nil || !strings.HasPrefix(got, "hello") {
		t.Fatalf("GET: %q, %v", got, err)
	}
	for _, tc := range []struct {
		path, access string
		status       int
		reason       string
	}{
		{"/.well-known/tp/reverse-http/blog", "", http.StatusConflict, "enrolled devices only"},
		{"/.well-known/tp/reverse-http/blog", "everyone", http.StatusBadRequest, "neither anyone nor devices"},
		{fmt.Sprintf("/.well-known/listen-tcp/0.0.0.0/%d/", e.pubPort), "devices", http.StatusBadRequest, "applies to HTTP apps"},
	} {
		c := e.dialTLS(t, e.alice, "http/1.1")
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		req := "GET " + tc.path + " HTTP/1.1\r\nHost: proxy.localhost\r\nConnection: upgrade\r\nUpgrade: reverse\r\n"
		if tc.access != "" {
			req += "TP-Access: " + tc.access + "\r\n"
		}
		if _, err := io.WriteString(c, req+"\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if resp.StatusCode != tc.status || !strings.Contains(string(body), tc.reason) {
			t.Fatalf("%s with TP-Access %q: %s %q; want %d with %q", tc.path, tc.access, resp.Status, body, tc.status, tc.reason)
		}
	}
	if e.srv.ReverseHTTPDevicesOnly("other.rev.test") {
		t.Fatal("ReverseHTTPDevicesOnly of a name nobody holds = true")
	}
}
