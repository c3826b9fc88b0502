package clients

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
)

// startReverseServer runs a real proxy.Server with reverse zone rev.test over
// TLS, and alice's agent exposing svc (protected, bob allowed) in front of
// local; it returns bob's TLS configuration and the server's address.
func startReverseServer(b testing.TB, local string) (string, *tls.Config) {
	b.Helper()
	return startReverseServerWith(b, local, nil)
}

// startReverseServerWith is startReverseServer with edit applied to the agent
// before it runs.
func startReverseServerWith(b testing.TB, local string, edit func(*Agent)) (string, *tls.Config) {
	b.Helper()
	ca := testpki.New(b)
	srv, err := proxy.New(proxy.Config{
		ProxyTLS: &tls.Config{
			Certificates: []tls.Certificate{ca.ServerCert(b, "localhost", "127.0.0.1")},
			ClientCAs:    ca.Pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
		},
		Identify: func(cs tls.ConnectionState) (authz.Identity, error) {
			return authz.IdentityFromCert(cs.PeerCertificates[0])
		},
		Authorizer: authorizerFunc(func(authz.Request) authz.Decision { return authz.Decision{Allow: true} }),
		Logger:     slog.New(slog.DiscardHandler),
		Reverse:    proxy.ReverseOptions{Zone: "rev.test"},
	})
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { _ = srv.Serve(ctx, ln); done <- struct{}{} }()
	agentCert := ca.ServerCert(b, "svc.rev.test")
	a := &Agent{
		Dialer: &Dialer{Server: ln.Addr().String(), Transport: TransportTLS,
			TLSConfig: &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{ca.ClientCert(b, "alice@laptop", testpki.LeafOptions{})}}},
		Exposed:     []Exposed{{Name: "svc", Local: local}},
		AllowUsers:  []string{"bob"},
		Certificate: func(context.Context, string) (*tls.Certificate, error) { return &agentCert, nil },
	}
	if edit != nil {
		edit(a)
	}
	registered := make(chan struct{}, 1)
	a.Registered = func([]string) {
		select {
		case registered <- struct{}{}:
		default:
		}
	}
	go func() { _ = a.Run(ctx); done <- struct{}{} }()
	b.Cleanup(func() { cancel(); <-done; <-done })
	select {
	case <-registered:
	case <-time.After(20 * time.Second):
		b.Fatal("the agent did not register")
	}
	return ln.Addr().String(), &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{ca.ClientCert(b, "bob@phone", testpki.LeafOptions{})}}
}

// BenchmarkE2EBulkThroughServer compares one session's throughput to a
// protected name through a real proxy.Server over TLS, in one process: as a
// stream of a carrier, and as a session of its own (attached).
func BenchmarkE2EBulkThroughServer(b *testing.B) {
	const size = 64 << 20
	sink := testnet.Serve(b, func(c *net.TCPConn) {
		_, _ = io.Copy(io.Discard, c)
		_ = c.CloseWrite()
	})
	addr, cfg := startReverseServer(b, sink)
	for _, mode := range []string{"each", "mux"} {
		b.Run(mode, func(b *testing.B) {
			d := &Dialer{Server: addr, TLSConfig: cfg, Transport: TransportTLS, NoE2EMux: mode == "each"}
			defer d.closeMux()
			defer d.Close()
			dial := func() net.Conn {
				c, err := d.DialContext(context.Background(), "tcp", "svc.rev.test:22")
				if err != nil {
					b.Fatal(err)
				}
				return c
			}
			bulk(b, dial(), 1<<20)
			b.SetBytes(size)
			b.ResetTimer()
			for range b.N {
				bulk(b, dial(), size)
			}
		})
	}
}
