package proxy_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpar"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// TestMain runs many tests at once (testpar): each starts its own server on
// loopback and spends most of its time waiting on it. Four, not more: this
// package runs beside the e2e package's processes, and eight race-built
// servers and clients in one process starved each other's handshakes there.
func TestMain(m *testing.M) {
	testpar.Default(4)
	os.Exit(m.Run())
}

// authorizerFunc adapts a function to authz.Authorizer.
type authorizerFunc func(ctx context.Context, req authz.Request) (authz.Decision, error)

func (f authorizerFunc) Authorize(ctx context.Context, req authz.Request) (authz.Decision, error) {
	return f(ctx, req)
}

var _ authz.Authorizer = authorizerFunc(nil)

func allowAll(context.Context, authz.Request) (authz.Decision, error) {
	return authz.Decision{Allow: true, Reason: "test allows everything"}, nil
}

// identifyCN is a stand-in for authz's chain→identity mapping: the leaf's CN.
func identifyCN(cs tls.ConnectionState) (authz.Identity, error) {
	leaf := cs.PeerCertificates[0]
	if leaf.Subject.CommonName == "" {
		return authz.Identity{}, errors.New("certificate has no device id")
	}
	return authz.Identity{DeviceID: leaf.Subject.CommonName, Serial: leaf.SerialNumber.Text(16), NotAfter: leaf.NotAfter}, nil
}

// mapResolver resolves names from a fixed table; everything else is NXDOMAIN-like.
type mapResolver map[string][]netip.Addr

func (m mapResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if ips, ok := m[host]; ok {
		return ips, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

type env struct {
	t    testing.TB
	ca   *testpki.CA
	srv  *proxy.Server
	addr string // the server's 127.0.0.1:port
	cert tls.Certificate
	echo string // an echo destination's 127.0.0.1:port
	// headStart is the QUIC head start of dialer's auto race. This server
	// serves no QUIC, so QUIC gets none (a millisecond): TLS wins every race
	// at once, instead of after QUIC's head starts (150 ms, then 500 ms with
	// the carriers) at every dial. newQUICEnv, which serves QUIC, clears it.
	headStart time.Duration
	cancel    context.CancelFunc
	served    chan error
}

// notify signals on ch without blocking: a callback (an agent's Registered)
// that blocked once the test stopped reading would hang the agent, and the
// cleanup that waits for it.
func notify(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// newEnv starts a Server on loopback with a fresh CA, an echo destination and a
// permissive authorizer; mod adjusts the config before New.
func newEnv(t testing.TB, mod func(*proxy.Config)) *env {
	t.Helper()
	ca := testpki.New(t)
	serverCert := ca.ServerCert(t, "localhost", "127.0.0.1")
	cfg := proxy.Config{
		ProxyTLS: &tls.Config{
			Certificates: []tls.Certificate{serverCert},
			ClientCAs:    ca.Pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
		},
		WebTLS: &tls.Config{Certificates: []tls.Certificate{serverCert}},
		Web: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Proto", r.Proto)
			_, _ = io.WriteString(w, "hello web")
		}),
		Identify:   identifyCN,
		Authorizer: authorizerFunc(allowAll),
		Logger:     discardLogger(),
	}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &env{t: t, ca: ca, srv: srv, addr: ln.Addr().String(), cancel: cancel, served: make(chan error, 1),
		cert: ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{}), headStart: time.Millisecond}
	go func() { e.served <- srv.Serve(ctx, ln) }()
	e.echo = testnet.Echo(t)
	t.Cleanup(func() {
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		_ = srv.Shutdown(sctx)
		cancel()
		<-e.served
	})
	return e
}

// clientTLS returns a client configuration trusting the test CA and presenting cert.
func (e *env) clientTLS(cert *tls.Certificate) *tls.Config {
	cfg := &tls.Config{RootCAs: e.ca.Pool, ServerName: "localhost"}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return cfg
}

func (e *env) dialer() *clients.Dialer {
	return &clients.Dialer{Server: e.addr, TLSConfig: e.clientTLS(&e.cert), Timeout: 10 * time.Second,
		HeadStart: e.headStart, CarrierHeadStart: e.headStart}
}

// rawConn opens a handshaken tp/1 connection for speaking the wire protocol by hand.
func (e *env) rawConn(t testing.TB) *tls.Conn {
	t.Helper()
	cfg := e.clientTLS(&e.cert)
	cfg.NextProtos = []string{wire.ALPN}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c
}

// dialVia dials network addr through d, within 10s; the connection is closed
// when the test ends.
func dialVia(t testing.TB, d *clients.Dialer, network, addr string) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		t.Fatalf("dial %s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// mustEcho dials the echo destination through the server and checks a round trip.
// Bad-input tests call it afterwards to show the server still serves.
func (e *env) mustEcho(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Over TLS alone where the server serves no QUIC (newEnv's head start):
	// there the auto race would make each check five handshakes (QUIC, three
	// carriers, TLS) where one says whether the server serves, and on a
	// loaded machine those five starved each other past 10 s. A server that
	// serves QUIC (newQUICEnv) is checked as a client would reach it.
	d := e.dialer()
	if e.headStart != 0 {
		d.Transport = clients.TransportTLS
	}
	c, err := d.DialContext(ctx, "tcp", e.echo)
	if err != nil {
		t.Fatalf("good dial after bad input: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "ping" {
		t.Fatalf("echo = %q, %v; want \"ping\"", got, err)
	}
}
