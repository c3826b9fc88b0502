package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// The Client's tests run it against a real proxy.Server on loopback, with a
// plain request (dialEcho): the hello exchange and the answer. Package
// clients builds its requests (early bytes, end-to-end TLS, the retry rules)
// on the same Trip.

type allowAll struct{}

func (allowAll) Authorize(context.Context, authz.Request) (authz.Decision, error) {
	return authz.Decision{Allow: true}, nil
}

// startServer runs a proxy.Server on loopback until the test ends, with a
// fresh test CA; with quicAddr it also serves QUIC with qopts, on the UDP
// address it stores there. It returns the TCP address and a client
// configuration that trusts the CA and presents alice@laptop's certificate.
func startServer(t testing.TB, quicAddr *string, qopts proxy.QUICOptions) (string, *tls.Config) {
	t.Helper()
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
		Authorizer: allowAll{},
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
	cert := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	return ln.Addr().String(), &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{cert}}
}

// errExchange is a request that failed before any answer: worth a retry on a
// new connection after a spare failed.
type errExchange struct{ error }

func (e errExchange) Unwrap() error { return e.error }

// dialEcho dials addr through cl with a plain request and returns the stream
// once the server said ok.
func dialEcho(ctx context.Context, cl *Client, addr string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, err
	}
	hello := wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: host, Port: port}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	return cl.RoundTrip(ctx, Trip{Kind: TripDial, What: "tp dial " + addr,
		Retry: exchangeRetry{},
		Run: func(ctx context.Context, s *Stream) (net.Conn, error) {
			var hb []byte
			if s.Mux != nil {
				buf := &bytesBuf{}
				if err := wire.WriteClientHello(buf, hello); err != nil {
					return nil, err
				}
				hb = buf.b
				if _, err := s.OpenMux(hb); err != nil {
					s.Refused = true
					return nil, err
				}
			} else if err := wire.WriteClientHello(s, hello); err != nil {
				_ = s.Close()
				return nil, errExchange{err}
			}
			stop := context.AfterFunc(ctx, func() { _ = s.SetDeadline(time.Unix(1, 0)) })
			sh, err := wire.ReadServerHello(s)
			stop()
			if err != nil {
				_ = s.Close()
				return nil, errExchange{err}
			}
			_ = s.SetDeadline(time.Time{})
			if !sh.OK {
				_ = s.Close()
				return nil, fmt.Errorf("refused: %s: %s", sh.Code, sh.Reason)
			}
			return s.Stream, nil
		}})
}

// exchangeRetry runs a request again on a new connection after a spare
// failed before any answer (errExchange), and after a lost connection.
type exchangeRetry struct{}

func (exchangeRetry) Resend(error) bool { return true }

func (exchangeRetry) RetryOnNew(err error) bool {
	var x errExchange
	return errors.As(err, &x)
}

type bytesBuf struct{ b []byte }

func (b *bytesBuf) Write(p []byte) (int, error) { b.b = append(b.b, p...); return len(p), nil }
