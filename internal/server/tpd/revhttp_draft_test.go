package tpd

// Reverse tunnels against a real tpd, with a client written in the test from
// the text of draft-kazuho-httpbis-reverse-tunnel (and docs/HTTP.md §2): the
// tunnel request is sent over HTTP/1.1 (GET, Upgrade: reverse), over h2
// (extended CONNECT, RFC 8441, with golang.org/x/net/http2's client) and over
// h3 (extended CONNECT, RFC 9220, with quic-go's HTTP/3 client); after success
// the roles are reversed and the test serves on the tunnel. Every combination
// of establishment and what runs inside is checked: an HTTP app with
// http/1.1 and with h2 inside (reached through tpd's website by its name), and
// the listen-tcp relay with accept and bind semantics.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/net/http2"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// draftPolicy lets alice do anything and bob expose (apps, public ports);
// carol may do nothing.
const draftPolicy = `package tp.authz

default allow := false

allow if input.identity.user == "alice"

allow if {
	input.identity.user == "bob"
	input.action in {"listen", "expose_public", "expose_http"}
}

reason := sprintf("the draft test policy lets %s do nothing", [input.identity.device_id]) if not allow
`

// draftConn is a reverse tunnel's byte stream as a net.Conn, whatever carried
// the tunnel request. Deadlines are not carried (the tests bound themselves).
type draftConn struct {
	io.Reader
	io.Writer
	close      func() error
	closeWrite func() error
	local      net.Addr
	remote     net.Addr
}

func (c *draftConn) Close() error                     { return c.close() }
func (c *draftConn) CloseWrite() error                { return c.closeWrite() }
func (c *draftConn) LocalAddr() net.Addr              { return c.local }
func (c *draftConn) RemoteAddr() net.Addr             { return c.remote }
func (c *draftConn) SetDeadline(time.Time) error      { return nil }
func (c *draftConn) SetReadDeadline(time.Time) error  { return nil }
func (c *draftConn) SetWriteDeadline(time.Time) error { return nil }

// draftTunnel sends the draft's tunnel request for path over version
// ("http/1.1", "h2" or "h3") with the given certificate and ALPN field ("" for
// none), and returns the final response (after any 100 Continue) and, on
// success, the tunnel.
func (r *connectRig) draftTunnel(t *testing.T, cert tls.Certificate, version, path, alpn string) (*http.Response, *draftConn) {
	t.Helper()
	cfg := r.tlsConfig(version)
	cfg.Certificates = []tls.Certificate{cert}
	switch version {
	case "http/1.1":
		// Draft section 3.1: GET with Upgrade: reverse; success is 101.
		c, err := tls.Dial("tcp", r.addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
		req := "GET " + path + " HTTP/1.1\r\nHost: " + proxyName + "\r\nConnection: upgrade\r\nUpgrade: reverse\r\n"
		if alpn != "" {
			req += "ALPN: " + alpn + "\r\n"
		}
		if _, err := io.WriteString(c, req+"\r\n"); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		for {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("reading the answer to the HTTP/1.1 tunnel request: %v", err)
			}
			if resp.StatusCode == http.StatusContinue {
				continue
			}
			if resp.StatusCode != http.StatusSwitchingProtocols {
				return resp, nil
			}
			return resp, &draftConn{Reader: br, Writer: c, close: c.Close, closeWrite: c.CloseWrite,
				local: c.LocalAddr(), remote: c.RemoteAddr()}
		}
	case "h2":
		// RFC 8441: CONNECT with :protocol reverse, :scheme, :path and
		// :authority; success is 200, the tunnel is the stream's DATA.
		c, err := tls.Dial("tcp", r.addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		cc, err := (&http2.Transport{}).NewClientConn(c)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		pr, pw := io.Pipe()
		h := http.Header{":protocol": {"reverse"}}
		if alpn != "" {
			h.Set("Alpn", alpn)
		}
		req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Scheme: "https", Host: proxyName, Path: path},
			Host: proxyName, Header: h, Body: pr, ContentLength: -1}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		t.Cleanup(cancel)
		resp, err := cc.RoundTrip(req.WithContext(ctx))
		if err != nil {
			t.Fatalf("h2 extended CONNECT: %v", err)
		}
		if resp.StatusCode != http.StatusOK {
			return resp, nil
		}
		return resp, &draftConn{Reader: resp.Body, Writer: pw,
			close:      func() error { pw.Close(); return resp.Body.Close() },
			closeWrite: pw.Close, local: c.LocalAddr(), remote: c.RemoteAddr()}
	case "h3":
		// RFC 9220: the same fields on an HTTP/3 request stream.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		t.Cleanup(cancel)
		qc, err := quic.DialAddr(ctx, r.addr, cfg, &quic.Config{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { qc.CloseWithError(0, "") })
		cc := (&http3.Transport{}).NewClientConn(qc)
		select {
		case <-cc.ReceivedSettings():
		case <-ctx.Done():
			t.Fatal("no SETTINGS from tpd's h3 server")
		}
		if !cc.Settings().EnableExtendedConnect {
			t.Fatal("tpd's h3 server did not send SETTINGS_ENABLE_CONNECT_PROTOCOL")
		}
		rs, err := cc.OpenRequestStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		h := http.Header{}
		if alpn != "" {
			h.Set("Alpn", alpn)
		}
		req := &http.Request{Method: http.MethodConnect, Proto: "reverse", Host: proxyName, Header: h,
			URL: &url.URL{Scheme: "https", Host: proxyName, Path: path}}
		if err := rs.SendRequestHeader(req); err != nil {
			t.Fatal(err)
		}
		var resp *http.Response
		for {
			if resp, err = rs.ReadResponse(); err != nil {
				t.Fatalf("h3 extended CONNECT: %v", err)
			}
			if resp.StatusCode != http.StatusContinue {
				break
			}
		}
		if resp.StatusCode != http.StatusOK {
			return resp, nil
		}
		return resp, &draftConn{Reader: rs, Writer: rs, close: func() error { rs.CancelRead(0); return rs.Close() },
			closeWrite: rs.Close, local: qc.LocalAddr(), remote: qc.RemoteAddr()}
	}
	t.Fatalf("no HTTP version %q", version)
	return nil, nil
}

// draftApp answers /hello with the Host it was asked for and the HTTP version
// the request came in over the tunnel.
var draftApp = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintf(w, "hello %s over %s", r.Host, r.Proto)
})

// serveOn serves h on the tunnel as what Selected-ALPN chose.
func serveOn(t *testing.T, conn net.Conn, inside string, h http.Handler) {
	t.Helper()
	if inside == "h2" {
		go (&http2.Server{}).ServeConn(conn, &http2.ServeConnOpts{Handler: h})
		return
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 30 * time.Second}
	ln := &oneConnListener{c: conn, done: make(chan struct{})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
}

// oneConnListener yields one connection, then blocks until closed.
type oneConnListener struct {
	mu   sync.Mutex
	c    net.Conn
	done chan struct{}
	once sync.Once
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.c
	l.c = nil
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *oneConnListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// website GETs path from name on tpd's public port as a browser would: no
// client certificate, TP's root trusted.
func (r *connectRig) website(t *testing.T, name, path string) (int, string) {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: r.roots}, ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, r.addr)
		}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 60 * time.Second}).Get("https://" + name + ":" + r.port + path)
	if err != nil {
		t.Fatalf("GET https://%s%s through tpd's website: %v", name, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// An HTTP app exposed by the draft's client over each establishment (HTTP/1.1
// Upgrade, h2 and h3 extended CONNECT) and with each ALPN offer is served by
// tpd's website under its name: TP selects h2 when offered (Selected-ALPN),
// http/1.1 when only that is offered, and sends no Selected-ALPN without an
// ALPN field (the draft's MUST NOT), speaking HTTP/1.1. The app answers over
// what was selected. Bad input: an ALPN field offering only a protocol TP
// cannot speak inside (400).
func TestDraftClientExposesHTTPApp(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, draftPolicy)
	zone := r.d.cfg.ReverseZone
	for i, version := range []string{"http/1.1", "h2", "h3"} {
		for j, tc := range []struct{ offer, selected, inside string }{
			{"h2, http%2F1.1", "h2", "h2"},
			{"http%2F1.1", "http%2F1.1", "http/1.1"},
			{"", "", "http/1.1"},
		} {
			label := fmt.Sprintf("draft%d%d", i, j)
			t.Run(version+"/alpn="+tc.offer, func(t *testing.T) {
				resp, tun := r.draftTunnel(t, r.cert, version, "/.well-known/tp/reverse-http/"+label, tc.offer)
				if tun == nil {
					b, _ := io.ReadAll(resp.Body)
					t.Fatalf("tunnel request: %s %q", resp.Status, b)
				}
				defer tun.Close()
				if got, has := resp.Header.Get("Selected-Alpn"), len(resp.Header.Values("Selected-Alpn")) > 0; got != tc.selected || has != (tc.selected != "") {
					t.Fatalf("Selected-ALPN %q (present %v); want %q", got, has, tc.selected)
				}
				serveOn(t, tun, tc.inside, draftApp)
				name := label + "." + zone
				want := "hello " + name + ":" + r.port + " over HTTP/1.1"
				if tc.inside == "h2" {
					want = "hello " + name + ":" + r.port + " over HTTP/2.0"
				}
				if st, body := r.website(t, name, "/hello"); st != 200 || body != want {
					t.Fatalf("https://%s/hello: %d %q; want 200 %q", name, st, body, want)
				}
			})
		}
	}
	t.Run("unsupported ALPN", func(t *testing.T) {
		resp, tun := r.draftTunnel(t, r.cert, "http/1.1", "/.well-known/tp/reverse-http/draftbad", "h3")
		if tun != nil {
			t.Fatal("a tunnel that offered only h3 inside was established")
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 400 || !strings.Contains(string(b), "h2 or http/1.1") {
			t.Fatalf("ALPN h3 only: %s %q; want 400 saying what TP speaks inside", resp.Status, b)
		}
	})
}

// echoChecksum sends n random bytes on c, half-closes and checks the same
// bytes come back to a clean end.
func echoChecksum(t *testing.T, c net.Conn, n int) {
	t.Helper()
	data := make([]byte, n)
	_, _ = rand.Read(data)
	go func() {
		_, _ = c.Write(data)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatalf("echo of %d bytes: %d bytes back with another checksum, %v", n, len(got), err)
	}
}

// dialPublic dials a public port of tpd until it opens.
func dialPublic(t *testing.T, port int) *net.TCPConn {
	t.Helper()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c.(*net.TCPConn)
		}
		if time.Now().After(deadline) {
			t.Fatalf("public port %d did not open within 60s: %v", port, err)
		}
		time.Sleep(20 * time.Millisecond) // polling for the port, bounded by the deadline above
	}
}

// The draft's listen-tcp relay against a real tpd, over each establishment:
// accept semantics (each tunnel request is one accepted connection, answered
// with Forwarded naming the public client) and bind semantics (ALPN h2: one
// tunnel, a CONNECT on it per connection, END_STREAM as half-close). Over
// HTTP/1.1 (close_notify) and h3 (FIN) accept carries half-close; over h2 it
// does not (docs/HTTP.md §4), so there the echo is read by length.
func TestDraftClientListenTCP(t *testing.T) {
	t.Parallel()
	ports := []int{testnet.FreePort(t, "tcp"), testnet.FreePort(t, "tcp"), testnet.FreePort(t, "tcp")}
	r := newConnectRig(t, draftPolicy, func(c *config.Server) {
		c.PublicPorts = fmt.Sprintf("%d, %d, %d", ports[0], ports[1], ports[2])
	})
	for i, version := range []string{"http/1.1", "h2", "h3"} {
		port := ports[i]
		path := fmt.Sprintf("/.well-known/listen-tcp/0.0.0.0/%d/", port)
		t.Run(version+"/accept", func(t *testing.T) {
			type result struct {
				resp *http.Response
				tun  *draftConn
			}
			got := make(chan result, 1)
			go func() {
				resp, tun := r.draftTunnel(t, r.cert, version, path, "")
				got <- result{resp, tun}
			}()
			pub := dialPublic(t, port)
			var res result
			select {
			case res = <-got:
			case <-time.After(60 * time.Second):
				t.Fatal("the accept tunnel was not answered within 60s of a public connection")
			}
			if res.tun == nil {
				t.Fatalf("listen-tcp accept: %s", res.resp.Status)
			}
			defer res.tun.Close()
			if fwd := res.resp.Header.Get("Forwarded"); !strings.Contains(fwd, `for="`+pub.LocalAddr().String()+`"`) {
				t.Fatalf("Forwarded %q does not name the public client %s", fwd, pub.LocalAddr())
			}
			if len(res.resp.Header.Values("Selected-Alpn")) != 0 {
				t.Fatalf("an accept tunnel without an ALPN field got Selected-ALPN %q", res.resp.Header.Get("Selected-Alpn"))
			}
			if version != "h2" {
				go func() {
					_, _ = io.Copy(res.tun, res.tun)
					_ = res.tun.CloseWrite()
				}()
				echoChecksum(t, pub, 256<<10)
				return
			}
			go func() { _, _ = io.Copy(res.tun, res.tun) }()
			msg := make([]byte, 64<<10)
			_, _ = rand.Read(msg)
			_ = pub.SetDeadline(time.Now().Add(60 * time.Second))
			go pub.Write(msg)
			back := make([]byte, len(msg))
			if _, err := io.ReadFull(pub, back); err != nil || !bytes.Equal(back, msg) {
				t.Fatalf("echo through the %s accept tunnel: %v", version, err)
			}
		})
		t.Run(version+"/bind", func(t *testing.T) {
			resp, tun := r.draftTunnel(t, r.cert, version, path, "h2")
			if tun == nil {
				t.Fatalf("listen-tcp bind: %s", resp.Status)
			}
			defer tun.Close()
			if got := resp.Header.Get("Selected-Alpn"); got != "h2" {
				t.Fatalf("Selected-ALPN %q; want h2 (bind)", got)
			}
			connects := make(chan *http.Request, 4)
			go (&http2.Server{}).ServeConn(tun, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
				if req.Method != http.MethodConnect {
					http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
					return
				}
				connects <- req
				w.WriteHeader(http.StatusOK)
				rc := http.NewResponseController(w)
				_ = rc.Flush()
				buf := make([]byte, 32<<10)
				for {
					n, err := req.Body.Read(buf)
					if n > 0 {
						if _, werr := w.Write(buf[:n]); werr != nil {
							return
						}
						_ = rc.Flush()
					}
					if err != nil {
						return // END_STREAM: the public client's half-close, passed on
					}
				}
			})})
			for range 2 { // two connections, two CONNECT streams on the one tunnel
				pub := dialPublic(t, port)
				echoChecksum(t, pub, 256<<10)
				req := <-connects
				if req.Host != "0.0.0.0:"+strconv.Itoa(port) || !strings.Contains(req.Header.Get("Forwarded"), `for="`+pub.LocalAddr().String()+`"`) {
					t.Fatalf("the bound tunnel's CONNECT: :authority %q, Forwarded %q; want 0.0.0.0:%d and the public client", req.Host, req.Header.Get("Forwarded"), port)
				}
			}
		})
	}
}

// listen-tcp and tp expose --public share one registry of public ports and
// one policy action: a port held by one identity's listen-tcp tunnel is
// refused to another identity's tp expose --public, and the other way round;
// a port outside public-ports and a device the policy refuses get 403 with a
// reason.
func TestListenTCPSharesPublicPorts(t *testing.T) {
	t.Parallel()
	held, agentPort, outside := testnet.FreePort(t, "tcp"), testnet.FreePort(t, "tcp"), testnet.FreePort(t, "tcp")
	r := newConnectRig(t, draftPolicy, func(c *config.Server) {
		c.PublicPorts = fmt.Sprintf("%d, %d", held, agentPort)
	})
	bob, _, _ := enrollClient(t, r.d, r.d.cfg.PublicURL(), "bob", "desk")
	carol, _, _ := enrollClient(t, r.d, r.d.cfg.PublicURL(), "carol", "pc")
	carolCert, err := carol.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}

	// Alice's listen-tcp tunnel (bind semantics: established at once) holds port held.
	resp, tun := r.draftTunnel(t, r.cert, "http/1.1", fmt.Sprintf("/.well-known/listen-tcp/0.0.0.0/%d/", held), "h2")
	if tun == nil {
		t.Fatalf("alice's listen-tcp tunnel: %s", resp.Status)
	}
	defer tun.Close()
	_, err = runAgent(t, bob, clients.TransportTLS, []clients.Exposed{{Name: "bobs", Local: testnet.Echo(t), PublicPort: held}}, nil)
	wantRefused(t, err, wire.CodeNameTaken, fmt.Sprintf("public TCP port %d", held))

	// Bob's tp expose --public holds agentPort; alice's listen-tcp for it is refused.
	if _, err := runAgent(t, bob, clients.TransportTLS, []clients.Exposed{{Name: "bobs", Local: testnet.Echo(t), PublicPort: agentPort}}, nil); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		who    string
		cert   tls.Certificate
		port   int
		status int
		code   string
		reason string
	}{
		{"alice, for the port bob's agent holds", r.cert, agentPort, 403, wire.CodeNameTaken, "another identity"},
		{"alice, for a port outside public-ports", r.cert, outside, 403, wire.CodePublicRefused, "public-ports"},
		{"carol, whom the policy refuses", *carolCert, held, 403, wire.CodePolicyDenied, "lets carol@pc do nothing"},
	} {
		resp, tun := r.draftTunnel(t, tc.cert, "http/1.1", fmt.Sprintf("/.well-known/listen-tcp/0.0.0.0/%d/", tc.port), "")
		if tun != nil {
			tun.Close()
			t.Fatalf("%s: a tunnel was established", tc.who)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != tc.status || resp.Header.Get("Tp-Refusal") != tc.code || !strings.Contains(string(b), tc.reason) {
			t.Errorf("%s: %s Tp-Refusal %q %q; want %d %s saying %q", tc.who, resp.Status, resp.Header.Get("Tp-Refusal"), b, tc.status, tc.code, tc.reason)
		}
	}
}

// A public client that half-closes and then waits for the service's reply,
// which the service sends only after it saw the end. Over h3 the accept
// tunnel carries the half-close (FIN) and the whole reply arrives. Over h2 it
// cannot (docs/HTTP.md §4): the reply is lost, and both sides must learn it as
// an abort (a TCP reset; a stream reset), never as a clean end after a short
// reply.
func TestDraftClientListenTCPHalfCloseIsNoSilentCut(t *testing.T) {
	t.Parallel()
	ports := []int{testnet.FreePort(t, "tcp"), testnet.FreePort(t, "tcp")}
	r := newConnectRig(t, draftPolicy, func(c *config.Server) { c.PublicPorts = fmt.Sprintf("%d, %d", ports[0], ports[1]) })
	const reply = "the reply the service sends after the public client's end"
	for i, version := range []string{"h2", "h3"} {
		t.Run(version, func(t *testing.T) {
			path := fmt.Sprintf("/.well-known/listen-tcp/0.0.0.0/%d/", ports[i])
			got := make(chan *draftConn, 1)
			go func() {
				resp, tun := r.draftTunnel(t, r.cert, version, path, "")
				if tun == nil {
					t.Errorf("listen-tcp accept over %s: %s", version, resp.Status)
				}
				got <- tun
			}()
			pub := dialPublic(t, ports[i])
			tun := <-got
			if tun == nil {
				t.FailNow()
			}
			defer tun.Close()
			svc := make(chan error, 1)
			go func() {
				b, err := io.ReadAll(tun)
				if err == nil && string(b) == "question" {
					_, err = tun.Write([]byte(reply))
					if err == nil {
						err = tun.CloseWrite()
					}
				}
				svc <- err
			}()
			_, _ = pub.Write([]byte("question"))
			_ = pub.CloseWrite()
			_ = pub.SetDeadline(time.Now().Add(30 * time.Second))
			b, err := io.ReadAll(pub)
			if err == nil && string(b) != reply {
				t.Fatalf("the public client got %q and a clean end; want the whole reply or an abort", b)
			}
			if version == "h3" && (err != nil || string(b) != reply) {
				t.Fatalf("over h3 the public client got %q, %v; want the whole reply after its half-close", b, err)
			}
			t.Logf("public client: %q, %v", b, err)
			select {
			case err := <-svc:
				if version == "h3" && err != nil {
					t.Fatalf("over h3 the service's side ended with %v; want a clean end", err)
				}
				t.Logf("service: %v", err)
			case <-time.After(30 * time.Second):
				t.Fatal("the service's side of the tunnel neither ended nor was reset within 30s")
			}
		})
	}
}

// A policy change that no longer allows a tunnel ends it as an abort over
// every establishment (HTTP/1.1: a TCP reset; h2: RST_STREAM; h3: a stream
// reset), so the service never takes the cut for a clean end.
func TestDraftClientTunnelCutByPolicy(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, draftPolicy)
	type open struct {
		version string
		tun     *draftConn
	}
	var tunnels []open
	for i, version := range []string{"http/1.1", "h2", "h3"} {
		resp, tun := r.draftTunnel(t, r.cert, version, fmt.Sprintf("/.well-known/tp/reverse-http/cut%d", i), "http%2F1.1")
		if tun == nil {
			t.Fatalf("%s tunnel: %s", version, resp.Status)
		}
		defer tun.Close()
		tunnels = append(tunnels, open{version, tun})
	}
	ends := make(chan string, len(tunnels))
	for _, o := range tunnels {
		go func() {
			_, err := io.ReadAll(o.tun)
			if err == nil {
				ends <- o.version + ": a clean end"
				return
			}
			ends <- ""
		}()
	}
	writePEM(t, filepath.Join(r.d.cfg.PolicyDir(), "tp.rego"), []byte("package tp.authz\n\ndefault allow := false\n"))
	if err := r.d.ReloadPolicy(context.Background()); err != nil {
		t.Fatal(err)
	}
	for range tunnels {
		select {
		case bad := <-ends:
			if bad != "" {
				t.Errorf("after a policy change that denies it, %s; want an abort", bad)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("a tunnel the policy no longer allows was still open 60s after the change")
		}
	}
}
