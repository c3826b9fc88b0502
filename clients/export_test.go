package clients

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
)

// authorizerFunc adapts a function to authz.Authorizer.
type authorizerFunc func(authz.Request) authz.Decision

func (f authorizerFunc) Authorize(_ context.Context, req authz.Request) (authz.Decision, error) {
	return f(req), nil
}

// StartTestServer runs a real proxy.Server on loopback until the test ends, with
// a fresh test CA; a device's identity is its certificate's CN, and decide
// answers each request (nil: every request is allowed). It returns the server's
// address and a client configuration that trusts the CA and presents
// alice@laptop's certificate. This package's tests and clients_test share it.
func StartTestServer(t testing.TB, decide func(authz.Request) authz.Decision) (string, *tls.Config) {
	t.Helper()
	return startTestServer(t, decide, nil, proxy.QUICOptions{})
}

// startTestServer is StartTestServer; with quicAddr it also serves QUIC with
// qopts, on the UDP address it stores there.
func startTestServer(t testing.TB, decide func(authz.Request) authz.Decision, quicAddr *string, qopts proxy.QUICOptions) (string, *tls.Config) {
	t.Helper()
	if decide == nil {
		decide = func(authz.Request) authz.Decision { return authz.Decision{Allow: true} }
	}
	ca := testpki.New(t)
	srv, err := proxy.New(proxy.Config{
		ProxyTLS: &tls.Config{
			Certificates: []tls.Certificate{ca.ServerCert(t, "localhost", "127.0.0.1")},
			ClientCAs:    ca.Pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
		},
		Identify: func(cs tls.ConnectionState) (authz.Identity, error) {
			leaf := cs.PeerCertificates[0]
			return authz.Identity{DeviceID: leaf.Subject.CommonName, NotAfter: leaf.NotAfter}, nil
		},
		Authorizer: authorizerFunc(decide),
		Logger:     slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	cert := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	if quicAddr != nil {
		pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		*quicAddr = pc.LocalAddr().String()
		qdone := make(chan struct{})
		go func() { _ = srv.ServeQUIC(ctx, pc, qopts); close(qdone) }()
		t.Cleanup(func() { cancel(); <-qdone })
	}
	return ln.Addr().String(), &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{cert}}
}

// NudgeAfter is how long a QUIC connection that was receiving waits in
// silence before it nudges its server.
const NudgeAfter = transport.NudgeAfter

// StartTestServerQUIC is StartTestServer that also serves QUIC, and returns a
// Dialer that uses it.
func StartTestServerQUIC(t testing.TB, decide func(authz.Request) authz.Decision) *Dialer {
	t.Helper()
	var quicAddr string
	addr, cfg := startTestServer(t, decide, &quicAddr, proxy.QUICOptions{})
	d := &Dialer{Server: addr, QUICServer: quicAddr, TLSConfig: cfg, Transport: TransportQUIC}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// CarrierTestServer is a proxy.Server on loopback that serves TLS (with a
// website, so that the ws carrier has its side of the port) and QUIC, for the
// carrier tests.
type CarrierTestServer struct {
	TCP, UDP string
	TLS      *tls.Config
	Srv      *proxy.Server
}

// StartCarrierTestServer starts a CarrierTestServer; decide as for StartTestServer.
func StartCarrierTestServer(t testing.TB, decide func(authz.Request) authz.Decision, copts proxy.CarrierOptions) *CarrierTestServer {
	t.Helper()
	if decide == nil {
		decide = func(authz.Request) authz.Decision { return authz.Decision{Allow: true} }
	}
	ca := testpki.New(t)
	cert := ca.ServerCert(t, "localhost", "127.0.0.1")
	srv, err := proxy.New(proxy.Config{
		ProxyTLS: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientCAs:    ca.Pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
		},
		WebTLS: &tls.Config{Certificates: []tls.Certificate{cert}},
		Web: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			_, _ = w.Write([]byte("the website\n"))
		}),
		Identify: func(cs tls.ConnectionState) (authz.Identity, error) {
			leaf := cs.PeerCertificates[0]
			return authz.Identity{DeviceID: leaf.Subject.CommonName, NotAfter: leaf.NotAfter}, nil
		},
		Authorizer: authorizerFunc(decide),
		// A UDP flow may idle while a test moves megabytes on another
		// stream (TestCarrierSwitchMidTransfer): on a loaded machine that
		// takes longer than the server's 60 s default, which would end the
		// flow cleanly under the test; the tests' own deadlines are shorter
		// than this.
		UDP:    proxy.UDPOptions{IdleTimeout: 10 * time.Minute},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { _ = srv.Serve(ctx, ln); done <- struct{}{} }()
	go func() { _ = srv.ServeQUIC(ctx, pc, proxy.QUICOptions{Carriers: copts}); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done })
	ccert := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	return &CarrierTestServer{
		TCP: ln.Addr().String(), UDP: pc.LocalAddr().String(), Srv: srv,
		TLS: &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{ccert}},
	}
}

// Dialer returns a Dialer for the server over carrier.
func (s *CarrierTestServer) Dialer(t testing.TB, carrier string) *Dialer {
	d := &Dialer{Server: s.TCP, QUICServer: s.UDP, TLSConfig: s.TLS, Carrier: carrier, Transport: TransportQUIC}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// CarrierLinks is how many links the Dialer's carrier opened (1 + reconnects).
func (d *Dialer) CarrierLinks() int64 {
	if cc, ok := d.transport().PacketConn().(*transport.CarrierConn); ok {
		return cc.Links()
	}
	return 0
}

// BreakCarrierLink closes the Dialer's current carrier link, as a proxy that
// cuts long connections would.
func (d *Dialer) BreakCarrierLink() {
	if cc, ok := d.transport().PacketConn().(*transport.CarrierConn); ok {
		cc.BreakLink()
	}
}
