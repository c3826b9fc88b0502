package proxy_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// errTestDeadline ends a bridge that nothing else ended.
var errTestDeadline = errors.New("the test's deadline ended the bridge")

// tlsPair is a TLS session over loopback TCP, handshaken: the client's end
// and the server's.
func tlsPair(t *testing.T, ca *testpki.CA) (client, server *tls.Conn) {
	t.Helper()
	cc, sc := testnet.Pair(t)
	roots := x509.NewCertPool()
	roots.AddCert(ca.Root)
	server = tls.Server(sc, &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "localhost")}})
	client = tls.Client(cc, &tls.Config{ServerName: "localhost", RootCAs: roots})
	done := make(chan error, 1)
	go func() { done <- server.Handshake() }()
	if err := client.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return client, server
}

// resetTCP ends c's TCP connection with a reset.
func resetTCP(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	_ = c.(*net.TCPConn).SetLinger(0)
	_ = c.Close()
}

// TestBridgePassesOnReadFailures: a read that fails on one side of a bridge
// ends the session at once as that side's failure: Bridge returns a
// *wire.CutError naming the side and carrying the read's error, and the other
// side's peer sees a reset. Each copy path Bridge has (spliced TCP, a socket
// read through its RawConn, TLS over TCP, any other stream) is tried with
// each way a read fails. Bad input: the side's peer resets it, or its owner
// closes it under the bridge. Nothing else ends the bridge but the test's
// own deadline: a bridge that ends with that has not passed the failure on.
func TestBridgePassesOnReadFailures(t *testing.T) {
	ca := testpki.New(t)
	type side struct {
		conn, peer net.Conn
	}
	tcp := func(t *testing.T) side { p, c := testnet.Pair(t); return side{c, p} }
	tlsSide := func(t *testing.T) side { p, c := tlsPair(t, ca); return side{c, p} }
	pipe := func(t *testing.T) side {
		c, p := net.Pipe()
		t.Cleanup(func() { c.Close(); p.Close() })
		return side{c, p}
	}
	for _, path := range []struct {
		name        string
		failing     func(*testing.T) side // the side whose read fails
		other       func(*testing.T) side
		peerResets  bool
		closedError error
	}{
		{"TCP to TCP (spliced)", tcp, tcp, true, net.ErrClosed},
		{"TCP to TLS (socket read)", tcp, tlsSide, true, net.ErrClosed},
		{"TLS over TCP", tlsSide, tcp, true, net.ErrClosed},
		{"an in-memory stream", pipe, tcp, false, io.ErrClosedPipe},
	} {
		for _, fail := range []struct {
			name string
			do   func(s side)
			want error
		}{
			{"the peer resets", func(s side) { resetTCP(s.peer) }, syscall.ECONNRESET},
			{"its owner closes it", func(s side) { _ = s.conn.Close() }, path.closedError},
		} {
			if fail.want == syscall.ECONNRESET && !path.peerResets {
				continue
			}
			t.Run(path.name+"/"+fail.name, func(t *testing.T) {
				a, b := path.failing(t), path.other(t)
				ctx, cancel := context.WithCancelCause(context.Background())
				defer cancel(nil)
				deadline := time.AfterFunc(20*time.Second, func() { cancel(errTestDeadline) })
				defer deadline.Stop()
				done := make(chan error, 1)
				go func() {
					_, _, err := wire.Bridge(ctx, a.conn, b.conn)
					done <- err
				}()
				fail.do(a)
				err := <-done
				if errors.Is(err, errTestDeadline) {
					t.Fatalf("the bridge went on until the test's deadline: the failed read (%v) was not passed on", fail.want)
				}
				var ce *wire.CutError
				if !errors.As(err, &ce) || ce.B || !errors.Is(err, fail.want) {
					t.Fatalf("Bridge = %v; want a cut of side A carrying %v", err, fail.want)
				}
				_ = b.peer.SetReadDeadline(time.Now().Add(20 * time.Second))
				_, err = io.Copy(io.Discard, b.peer)
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("the other side's peer read %v; want a reset (a clean end or silence would pass the cut for a complete session)", err)
				}
			})
		}
	}
}
