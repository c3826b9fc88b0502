package clients

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// muxTestServer runs a real proxy.Server on loopback (tp-mux/1 unless
// noMux, as an older tpd) and returns a TLS Dialer to it and the server.
func muxTestServer(t *testing.T, noMux bool, decide func(authz.Request) authz.Decision) (*Dialer, *proxy.Server) {
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
		NoTLSMux:   noMux,
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
	d := &Dialer{Server: ln.Addr().String(), Transport: TransportTLS, Timeout: 20 * time.Second,
		TLSConfig: &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{cert}}}
	t.Cleanup(func() { _ = d.Close() })
	return d, srv
}

// Many tunnels over TLS are streams of one tp-mux connection: 50 dials at
// once, 256 KiB each way with half-close, every byte back as sent and a clean
// end; one TLS handshake in all.
func TestTLSMuxManyTunnelsOneHandshake(t *testing.T) {
	t.Parallel()
	d, srv := muxTestServer(t, false, nil)
	echo := testnet.Echo(t)
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := d.DialContext(context.Background(), "tcp", echo)
			if err == nil {
				if _, ok := c.(*tunnel).Stream.(*mux.Stream); !ok {
					err = errors.New("a tunnel that is not a tp-mux stream")
				} else {
					err = checksummed(c, 256<<10)
				}
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := d.transport().TLSSessions().Started(); n != 1 {
		t.Fatalf("%d TLS handshakes for 50 tunnels; want 1", n)
	}
	if conns, streams := d.TLSMuxStats(); conns != 1 || streams != 50 {
		t.Fatalf("%d tp-mux connections, %d streams; want 1 and 50", conns, streams)
	}
	if n := srv.Stats().ProxyConns["tls"]; n != 1 {
		t.Fatalf("the server counted %d TLS proxy connections; want 1", n)
	}
}

// A refusal is readable per tunnel, and the connection carries on.
func TestTLSMuxRefusalReadable(t *testing.T) {
	t.Parallel()
	echo := testnet.Echo(t)
	d, _ := muxTestServer(t, false, func(r authz.Request) authz.Decision {
		if r.Destination.Port == 9 {
			return authz.Decision{Reason: "port 9 is closed"}
		}
		return authz.Decision{Allow: true}
	})
	open, err := d.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	_, err = d.DialContext(context.Background(), "tcp", "127.0.0.1:9")
	var re *RefusedError
	if !errors.As(err, &re) || re.Code != wire.CodePolicyDenied || re.Reason != "port 9 is closed" {
		t.Fatalf("a denied dial: %v; want policy_denied with the policy's reason", err)
	}
	echoes(t, open, "still open")
	if conns, _ := d.TLSMuxStats(); conns != 1 {
		t.Fatalf("%d tp-mux connections; want the refusal to leave the one", conns)
	}
}

// A server that does not select tp-mux/1 (an older tpd) gets a TLS
// connection per tunnel, starting with the one that found it out, and the
// Dialer does not offer tp-mux/1 again for a while.
func TestTLSMuxOlderServerFallsBack(t *testing.T) {
	t.Parallel()
	d, _ := muxTestServer(t, true, nil)
	echo := testnet.Echo(t)
	for i := range 3 {
		c, err := d.DialContext(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatal(err)
		}
		tc, ok := c.(*tunnel).Stream.(*tls.Conn)
		if !ok {
			t.Fatalf("dial %d: a %T; want a TLS connection of its own", i, c.(*tunnel).Stream)
		}
		if i > 0 { // the first runs on the connection that found the server out
			if _, ok := tc.NetConn().(*wire.EOFConn); !ok {
				t.Fatalf("dial %d: a TLS connection over %T; want an ordinary one, right over wire.EOFConn", i, tc.NetConn())
			}
		}
		echoes(t, c, "older")
	}
	if conns, streams := d.TLSMuxStats(); conns != 0 || streams != 0 {
		t.Fatalf("%d tp-mux connections, %d streams with an older server", conns, streams)
	}
	if none := d.transport().MuxPool().NoneUntil(); time.Until(none) < transport.MuxNoneFor/2 {
		t.Fatalf("the Dialer remembers the older server until %v; want about %v from now", none, transport.MuxNoneFor)
	}
}

// NoTLSMux keeps a TLS connection per tunnel.
func TestTLSMuxOff(t *testing.T) {
	t.Parallel()
	d, _ := muxTestServer(t, false, nil)
	d.NoTLSMux = true
	d.Spares = 1
	echo := testnet.Echo(t)
	c, err := d.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*tunnel).Stream.(*tls.Conn); !ok {
		t.Fatalf("a %T; want a TLS connection of its own", c.(*tunnel).Stream)
	}
	echoes(t, c, "per tunnel")
	if conns, _ := d.TLSMuxStats(); conns != 0 {
		t.Fatalf("%d tp-mux connections with NoTLSMux", conns)
	}
}

// A tp-mux connection that dies (its TCP connection reset) cuts every open
// tunnel: each reads an error, never an end of stream, and the next dial
// opens a new connection.
func TestTLSMuxDeadConnectionCutsTunnels(t *testing.T) {
	t.Parallel()
	d, _ := muxTestServer(t, false, nil)
	echo := testnet.Echo(t)
	var open []net.Conn
	for range 3 {
		c, err := d.DialContext(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		readEcho(t, c, "x")
		open = append(open, c)
	}
	m := d.transport().MuxPool().Conns()[0]
	wire.Abort(m.NetConn(), wire.QUICPeerReset)
	for i, c := range open {
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		_, err := io.ReadAll(c)
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("tunnel %d of a dead connection read %v; want a cut", i, err)
		}
		var ce *CutError
		if !errors.As(err, &ce) || !errors.Is(err, wire.ErrTruncated) {
			t.Fatalf("tunnel %d: %v (%T); want a *CutError of a truncated stream", i, err, err)
		}
	}
	c, err := d.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "after")
	if conns, _ := d.TLSMuxStats(); conns != 2 {
		t.Fatalf("%d tp-mux connections; want a second after the first died", conns)
	}
}

// A connection without tunnels closes cleanly after the pool's Idle, and the
// next dial opens a new one.
func TestTLSMuxIdleConnectionCloses(t *testing.T) {
	t.Parallel()
	d, _ := muxTestServer(t, false, nil)
	d.transport().MuxPool().Idle, d.transport().MuxPool().Tick = 200*time.Millisecond, 50*time.Millisecond
	echo := testnet.Echo(t)
	c, err := d.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "one")
	m := d.transport().MuxPool().Conns()[0]
	select {
	case <-m.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("an idle tp-mux connection stayed open")
	}
	if err := m.Err(); err == nil || err.Error() != "closed" {
		t.Fatalf("the idle connection ended with %v; want a clean close", err)
	}
	c, err = d.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "two")
	if conns, _ := d.TLSMuxStats(); conns != 2 {
		t.Fatalf("%d tp-mux connections; want a new one after the idle close", conns)
	}
}

// Bad input: a certificate from another CA. tpd's alert ends the tp-mux
// connection after the client's side of the handshake was done; the dial says
// the certificate was rejected (what `tp` turns into "run dlogin" and a
// question to the server), not that a connection took no stream.
func TestTLSMuxRejectedCertificate(t *testing.T) {
	t.Parallel()
	d, _ := muxTestServer(t, false, nil)
	other := testpki.New(t).ClientCert(t, "mallory@laptop", testpki.LeafOptions{})
	d.TLSConfig.Certificates = []tls.Certificate{other}
	_, err := d.DialContext(context.Background(), "tcp", testnet.Echo(t))
	if !errors.Is(err, ErrCertificateRejected) {
		t.Fatalf("a dial with another CA's certificate: %v; want %v", err, ErrCertificateRejected)
	}
}

// A re-check that cuts tunnels (the policy no longer allows them) while the
// tp-mux connection stays: each cut reads as policy_changed from its ABORT,
// and asking why goes on a stream of the same connection, so ten cut tunnels
// cost no further TLS handshake.
func TestTLSMuxCutsExplainedOnTheConnection(t *testing.T) {
	t.Parallel()
	var deny atomic.Bool // the policy no longer allows the destination
	d, srv := muxTestServer(t, false, func(r authz.Request) authz.Decision {
		if deny.Load() {
			return authz.Decision{Reason: "this port is closed now"}
		}
		return authz.Decision{Allow: true}
	})
	echo := testnet.Echo(t)
	var open []net.Conn
	for range 10 {
		c, err := d.DialContext(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		readEcho(t, c, "x")
		open = append(open, c)
	}
	deny.Store(true)
	if _, closed := srv.Recheck(context.Background()); closed != 10 {
		t.Fatalf("Recheck closed %d sessions; want the 10 open", closed)
	}
	for i, c := range open {
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		_, err := io.ReadAll(c)
		if code, ok := wire.StreamResetCode(err); !ok || code != wire.QUICPolicyChanged {
			t.Fatalf("tunnel %d read %v; want a cut with code policy_changed", i, err)
		}
		err = ExplainCut(context.Background(), err)
		var ce *CutError
		if !errors.As(err, &ce) || ce.End == nil || ce.End.Code != wire.EndPolicyChanged || ce.End.By != "server" {
			t.Fatalf("tunnel %d explained: %v; want policy_changed by the server", i, err)
		}
	}
	if n := d.transport().TLSSessions().Started(); n != 1 {
		t.Fatalf("%d TLS handshakes for 10 tunnels and 10 questions why; want 1 (why goes on the tp-mux connection)", n)
	}
}

// --transport auto where UDP does not get through (nothing serves QUIC at the
// server's address): the first dial's race is won by TLS, and the dials after
// it, which skip QUIC for a while, are streams of one tp-mux connection, as
// with --transport tls, not a connection each.
func TestTLSMuxAfterAutoFellBackToTLS(t *testing.T) {
	t.Parallel()
	d, _ := muxTestServer(t, false, nil)
	d.Transport = TransportAuto
	d.HeadStart = 10 * time.Millisecond
	echo := testnet.Echo(t)
	for i := range 4 {
		c, err := d.DialContext(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		echoes(t, c, "hello")
	}
	if conns, streams := d.TLSMuxStats(); conns != 1 || streams != 3 {
		t.Fatalf("%d tp-mux connections, %d streams after auto fell back to TLS; want 1 and the 3 dials after the race", conns, streams)
	}
}

// UDP flows over TLS are streams of the tp-mux connection too: three flows to
// a UDP echo beside a TCP tunnel, datagrams of 1 to 65,507 bytes back intact
// (capsules on the stream, PROTOCOL 12.2), and the policy asked with
// dial_udp for each; one TLS handshake in all.
func TestTLSMuxUDPFlows(t *testing.T) {
	t.Parallel()
	var udpAsks atomic.Int64
	d, _ := muxTestServer(t, false, func(r authz.Request) authz.Decision {
		if r.Action == authz.ActionDialUDP && r.Destination.Network == "udp" {
			udpAsks.Add(1)
		}
		return authz.Decision{Allow: true}
	})
	echo, uecho := testnet.Echo(t), testnet.EchoUDP(t)
	tcp, err := d.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		c, err := d.DialContext(context.Background(), "udp", uecho)
		if err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		flow, ok := c.(*wire.UDPFlow)
		if !ok {
			t.Fatalf("flow %d is a %T; want a *wire.UDPFlow", i, c)
		}
		for _, size := range []int{1, 1200, 20000, 65507} {
			msg := bytes.Repeat([]byte{byte(i + size)}, size)
			if _, err := flow.Write(msg); err != nil {
				t.Fatal(err)
			}
			_ = flow.SetReadDeadline(time.Now().Add(20 * time.Second)) // on a stream nothing is lost
			buf := make([]byte, 1<<16)
			n, err := flow.Read(buf)
			if err != nil || !bytes.Equal(buf[:n], msg) {
				t.Fatalf("flow %d: a datagram of %d bytes came back as %d bytes, %v", i, size, n, err)
			}
		}
		_ = flow.Close()
	}
	echoes(t, tcp, "tcp beside")
	if conns, streams := d.TLSMuxStats(); conns != 1 || streams != 4 {
		t.Fatalf("%d tp-mux connections, %d streams; want 1 connection carrying the 3 flows and the tunnel", conns, streams)
	}
	if n := d.transport().TLSSessions().Started(); n != 1 {
		t.Fatalf("%d TLS handshakes; want 1", n)
	}
	if n := udpAsks.Load(); n != 3 {
		t.Fatalf("the policy was asked dial_udp %d times; want 3", n)
	}
}
