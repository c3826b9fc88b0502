package proxy_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// quicEnv is an env whose server also serves QUIC on the TCP listener's port.
type quicEnv struct {
	*env
	udpAddr   string
	quicDone  chan error
	transport chan string // input.source.transport of each authorised request
}

func newQUICEnv(t testing.TB, mod func(*proxy.Config), opts proxy.QUICOptions) *quicEnv {
	t.Helper()
	transports := make(chan string, 64)
	var e *env
	var udp *net.UDPConn
	for try := 0; ; try++ {
		e = newEnv(t, func(c *proxy.Config) {
			c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
				select {
				case transports <- req.Source.Transport:
				default:
				}
				return allowAll(ctx, req)
			})
			if mod != nil {
				mod(c)
			}
		})
		var err error
		udp, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(mustAddrPort(t, e.addr)))
		if err == nil {
			break
		}
		// Another test's UDP socket may hold the port the TCP listener got: try
		// another server (this one is shut down at cleanup).
		if !errors.Is(err, syscall.EADDRINUSE) || try == 9 {
			t.Fatalf("UDP on the TCP listener's port: %v", err)
		}
	}
	e.headStart = 0 // QUIC is served: the dialer's defaults
	q := &quicEnv{env: e, udpAddr: udp.LocalAddr().String(), quicDone: make(chan error, 1), transport: transports}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { q.quicDone <- e.srv.ServeQUIC(ctx, udp, opts) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-q.quicDone:
		case <-time.After(10 * time.Second):
			t.Error("ServeQUIC did not return within 10s of cancel")
		}
	})
	// The carriers answer on the TCP port once ServeQUIC has started: a
	// test that asks them at once must not race its start.
	waitUntil(t, 10*time.Second, "ServeQUIC to start", e.srv.ServingQUIC)
	return q
}

func mustAddrPort(t testing.TB, addr string) netip.AddrPort {
	t.Helper()
	a, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return a.AddrPort()
}

func (q *quicEnv) quicDialer(t testing.TB) *clients.Dialer {
	d := q.dialer()
	d.Transport = clients.TransportQUIC
	t.Cleanup(func() { d.Close() })
	return d
}

// quicConn opens a raw QUIC connection with the test client certificate.
func (q *quicEnv) quicConn(t testing.TB, cert *tls.Certificate) (*quic.Conn, error) {
	t.Helper()
	cfg := q.clientTLS(cert)
	cfg.NextProtos = []string{wire.ALPN}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := quic.DialAddr(ctx, q.udpAddr, cfg, &quic.Config{})
	if err == nil {
		t.Cleanup(func() { c.CloseWithError(0, "") })
	}
	return c, err
}

// rawRequest opens a stream on c, sends a dial hello for dest and returns the
// stream after an ok.
func rawRequest(t testing.TB, c *quic.Conn, dest string) *quic.Stream {
	t.Helper()
	str, err := c.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	_ = str.SetDeadline(time.Now().Add(20 * time.Second))
	host, port, _ := net.SplitHostPort(dest)
	var p int
	for _, ch := range port {
		p = 10*p + int(ch-'0')
	}
	if err := wire.WriteClientHello(str, wire.ClientHello{V: 1, Op: "dial", Net: "tcp", Host: host, Port: p}); err != nil {
		t.Fatal(err)
	}
	sh, err := wire.ReadServerHello(str)
	if err != nil || !sh.OK {
		t.Fatalf("server hello %+v, %v", sh, err)
	}
	return str
}

func quicEcho(t testing.TB, rw io.ReadWriter, msg string) {
	t.Helper()
	if _, err := io.WriteString(rw, msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(rw, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q, %v; want %q", buf, err, msg)
	}
}

// TestQUICRequest: a request over QUIC reaches the echo destination with
// half-close carried through, and the policy sees transport "quic".
func TestQUICRequest(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	d := q.quicDialer(t)
	for i := range 3 { // one connection, a stream per request
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := d.DialContext(ctx, "tcp", q.echo)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := dialed(c).(interface{ Conn() *quic.Conn }); !ok {
			t.Fatalf("request %d: got %T, want a QUIC stream", i, dialed(c))
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "ping")
		if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "ping" {
			t.Fatalf("echo %q, %v", got, err)
		}
		c.Close()
		if tr := <-q.transport; tr != "quic" {
			t.Fatalf("policy saw transport %q, want quic", tr)
		}
	}
	q.mustEcho(t) // TLS still works beside it
}

// TestQUICRefusesBadClients: no client certificate, or one from another CA, gets no
// QUIC connection; a good client is unaffected.
func TestQUICRefusesBadClients(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	other := testpki.New(t).ClientCert(t, "mallory@laptop", testpki.LeafOptions{})
	for name, cert := range map[string]*tls.Certificate{"no certificate": nil, "other CA": &other} {
		t.Run(name, func(t *testing.T) {
			c, err := q.quicConn(t, cert)
			if err == nil {
				// TLS 1.3: the client may finish before the server rejects it.
				// OpenStream fails, too, once the server's alert has arrived.
				var str *quic.Stream
				if str, err = c.OpenStream(); err == nil {
					_ = str.SetDeadline(time.Now().Add(10 * time.Second))
					_ = wire.WriteClientHello(str, wire.ClientHello{V: 1, Op: "dial", Net: "tcp", Host: "127.0.0.1", Port: 1})
					_, err = wire.ReadServerHello(str)
				}
			}
			var te *quic.TransportError
			if !errors.As(err, &te) || !te.ErrorCode.IsCryptoError() {
				t.Fatalf("err = %v; want a TLS alert in CONNECTION_CLOSE", err)
			}
		})
	}
	c, err := q.quicConn(t, &q.cert)
	if err != nil {
		t.Fatal(err)
	}
	quicEcho(t, rawRequest(t, c, q.echo), "still fine")
}

// TestQUICHelloTimeout: a stream that never completes its hello is answered with
// hello_timeout and closed, while other streams on the same connection are served.
func TestQUICHelloTimeout(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) { c.HelloTimeout = 300 * time.Millisecond }, proxy.QUICOptions{})
	c, err := q.quicConn(t, &q.cert)
	if err != nil {
		t.Fatal(err)
	}
	stalled, err := c.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	_ = stalled.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := stalled.Write([]byte{0}); err != nil { // half a length prefix: the stream exists
		t.Fatal(err)
	}
	quicEcho(t, rawRequest(t, c, q.echo), "served meanwhile")
	sh, err := wire.ReadServerHello(stalled)
	if err != nil || sh.OK || sh.Code != wire.CodeHelloTimeout {
		t.Fatalf("stalled stream: %+v, %v; want code hello_timeout", sh, err)
	}
	if _, err := io.ReadAll(stalled); err != nil {
		t.Fatalf("after the refusal the server should end the stream cleanly: %v", err)
	}
	quicEcho(t, rawRequest(t, c, q.echo), "served after")
}

// TestQUICStreamLimit: a client cannot open more streams than MaxStreams at once;
// the open ones keep working, and a stream can be opened once one ends.
func TestQUICStreamLimit(t *testing.T) {
	t.Parallel()
	const limit = 3
	q := newQUICEnv(t, nil, proxy.QUICOptions{MaxStreams: limit})
	c, err := q.quicConn(t, &q.cert)
	if err != nil {
		t.Fatal(err)
	}
	var open []*quic.Stream
	for range limit {
		open = append(open, rawRequest(t, c, q.echo))
	}
	var limitErr *quic.StreamLimitReachedError
	if _, err := c.OpenStream(); !errors.As(err, &limitErr) {
		t.Fatalf("stream %d: err = %v; want StreamLimitReachedError", limit+1, err)
	}
	for i, s := range open {
		quicEcho(t, s, "open stream still works")
		if i == 0 {
			s.Close()
			io.ReadAll(s) // the echo half-closes back: the stream completes
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.OpenStreamSync(ctx); err != nil {
		t.Fatalf("after one stream ended, a new one should open: %v", err)
	}
	// Another connection is not affected by this one's limit.
	q.quicDialer(t)
	d := q.quicDialer(t)
	conn, err := d.DialContext(ctx, "tcp", q.echo)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	quicEcho(t, conn, "other connection")
	conn.Close()
}

// TestQUICTransfer: 16 MiB each way through one QUIC stream, checksummed, with the
// upload ending in a half-close. The size is not the point (the checksum and
// the half-close are): 64 MiB took three minutes under the race detector
// beside the e2e package's load.
func TestQUICTransfer(t *testing.T) {
	t.Parallel()
	size := int64(16 << 20)
	if testing.Short() {
		size = 8 << 20
	}
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	echoTransfer(t, dialVia(t, q.quicDialer(t), "tcp", q.echo), size, nil)
}

// TestQUICServerShutdownReported: when the server goes away under an established
// session, the client's read fails with an error that says so (not a silent EOF),
// and a new dial reconnects once the server is back.
func TestQUICServerShutdownReported(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	d := q.quicDialer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", q.echo)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	quicEcho(t, c, "before")

	sctx, scancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer scancel()
	_ = q.srv.Shutdown(sctx) // the session does not end by itself: forced
	_, err = c.Read(make([]byte, 1))
	if err == nil || wire.IsNormalEnd(err) || !strings.Contains(err.Error(), "TP server is shutting down") {
		t.Fatalf("read after server shutdown: %v; want an error naming the shutdown", err)
	}

	// A new server on the same port: the next dial reconnects by itself.
	qerr := <-q.quicDone // ServeQUIC has released the port
	q.quicDone <- qerr
	// The restarted server keeps its CA and certificate, as a restarted tpd
	// does: the Dialer, made before the restart, is used unchanged.
	q2 := &quicEnv{env: newEnv(t, func(c *proxy.Config) {
		c.ProxyTLS = &tls.Config{
			Certificates: []tls.Certificate{q.ca.ServerCert(t, "localhost", "127.0.0.1")},
			ClientCAs:    q.ca.Pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
		}
	})}
	udp, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(mustAddrPort(t, q.udpAddr)))
	if err != nil {
		t.Fatalf("cannot rebind the UDP port the stopped server released: %v", err)
	}
	rctx, rcancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- q2.srv.ServeQUIC(rctx, udp, proxy.QUICOptions{}) }()
	defer func() { rcancel(); <-done }()
	c2, err := d.DialContext(ctx, "tcp", q.echo)
	if err != nil {
		t.Fatalf("dial after restart: %v", err)
	}
	_ = c2.SetDeadline(time.Now().Add(10 * time.Second))
	quicEcho(t, c2, "after")
	c2.Close()
}

// TestAutoFallsBackToTLS: with nothing answering on UDP, auto tries QUIC (its
// packets reach the silent UDP socket), falls back to TLS, and remembers it:
// the Dialer's next dial is a stream of its tp-mux connection, and a new
// Dialer sharing the transport cache dials over TLS without sending anything
// over UDP (it does not race at all).
func TestAutoFallsBackToTLS(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	// deadUDP swallows everything, counting the datagrams.
	deadUDP := func() (string, *atomic.Int64) {
		dead, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dead.Close() })
		var n atomic.Int64
		go func() {
			b := make([]byte, 2048)
			for {
				if _, _, err := dead.ReadFrom(b); err != nil {
					return
				}
				n.Add(1)
			}
		}()
		return dead.LocalAddr().String(), &n
	}
	dead, tried := deadUDP()
	cache := &clients.TransportCache{Path: t.TempDir() + "/transport-cache.json"}
	d := e.dialer()
	d.Transport, d.QUICServer, d.Cache = clients.TransportAuto, dead, cache
	d.HeadStart, d.CarrierHeadStart = 0, 0 // the defaults' race is what is tested
	defer d.Close()
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := d.DialContext(ctx, "tcp", e.echo)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		// The race's winner carries the first dial; later ones are streams of a
		// tp-mux/1 connection, as --transport tls dials.
		if _, ok := dialed(c).(*tls.Conn); i == 0 && !ok {
			t.Fatalf("dial %d: got %T, want *tls.Conn", i, dialed(c))
		}
		if _, ok := dialed(c).(*mux.Stream); i > 0 && !ok {
			t.Fatalf("dial %d: got %T, want a tp-mux stream (*mux.Stream)", i, dialed(c))
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		quicEcho(t, c, "via tls")
		c.Close()
		if i == 0 && tried.Load() == 0 {
			t.Fatal("auto fell back to TLS without trying QUIC: no packet reached the UDP address")
		}
		if got := cache.Get(e.addr); got != clients.TransportTLS {
			t.Fatalf("cache says %q after dial %d, want tls", got, i)
		}
	}

	dead2, tried2 := deadUDP()
	d2 := e.dialer()
	d2.Transport, d2.QUICServer, d2.Cache = clients.TransportAuto, dead2, cache
	defer d2.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d2.DialContext(ctx, "tcp", e.echo)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	quicEcho(t, c, "via tls, remembered")
	c.Close()
	if n := tried2.Load(); n != 0 {
		t.Fatalf("a Dialer whose cache says tls sent %d datagrams to the QUIC address; want none (no race)", n)
	}
}

// TestAutoPrefersQUIC: with QUIC available, auto uses it and caches it.
func TestAutoPrefersQUIC(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	cache := &clients.TransportCache{Path: t.TempDir() + "/transport-cache.json"}
	d := q.dialer()
	d.Cache = cache
	defer d.Close()
	c := dialVia(t, d, "tcp", q.echo)
	if _, ok := dialed(c).(interface{ Conn() *quic.Conn }); !ok {
		t.Fatalf("auto picked %T, want a QUIC stream", dialed(c))
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	quicEcho(t, c, "via quic")
	if got := cache.Get(q.addr); got != clients.TransportQUIC {
		t.Fatalf("cache says %q, want quic", got)
	}
}

// dialed is the stream a Dialer's connection runs on: a dial's connection wraps
// it (so that a cut says who cut it).
func dialed(c net.Conn) net.Conn {
	if u, ok := c.(interface{ Unwrap() net.Conn }); ok {
		return u.Unwrap()
	}
	return c
}
