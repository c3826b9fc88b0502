package transport

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A session that finds no spare while one is being made waits for that one
// (it started earlier, so it is ready sooner than a new connection would be);
// a second such session does not queue behind the same handshake but connects
// on its own.
func TestSpareTLSWaitsForTheOneBeingMade(t *testing.T) {
	t.Parallel()
	d, _ := spareEnv(t)
	spare, _ := tlsPair(t)
	d.spare.mu.Lock()
	d.spare.filling = true // as if refillSpare were making one
	d.spare.mu.Unlock()

	type result struct {
		conn  *tls.Conn
		spare bool
		err   error
	}
	first := make(chan result, 1)
	go func() {
		c, sp, _, err := d.sessionTLS(context.Background())
		first <- result{c, sp, err}
	}()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) { // polling, bounded
		d.spare.mu.Lock()
		waiting := d.spare.waiter
		d.spare.mu.Unlock()
		if waiting {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a session without a spare did not wait for the one being made")
		}
	}
	c, sp, _, err := d.sessionTLS(context.Background()) // a second session meanwhile
	if err != nil || sp {
		t.Fatalf("the second session: spare %v, %v; want a new connection of its own", sp, err)
	}
	_ = c.Close()
	if n := d.tlsSessions.Started(); n != 1 {
		t.Fatalf("%d connections made; want 1 (the second session's; the first waits)", n)
	}

	d.spare.mu.Lock() // the refill delivers
	d.spare.conns = append(d.spare.conns, spareConn{conn: spare, made: time.Now()})
	d.spare.filling = false
	d.spare.notifyLocked()
	d.spare.mu.Unlock()
	r := <-first
	if r.err != nil || !r.spare || r.conn != spare {
		t.Fatalf("the waiting session got %p (spare %v, %v); want the spare %p", r.conn, r.spare, r.err, spare)
	}
}

// tlsPair is a handshaken TLS connection to a server that closes its side when
// told to (closeServer).
func tlsPair(t *testing.T) (client *tls.Conn, closeServer func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ca := testpki.New(t)
	srvCfg := &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "127.0.0.1")}}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		s := tls.Server(c, srvCfg)
		_ = s.SetDeadline(time.Now().Add(10 * time.Second))
		_ = s.Handshake()
		accepted <- s
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client = tls.Client(wire.NewEOFConn(raw), &tls.Config{RootCAs: ca.Pool, ServerName: "127.0.0.1"})
	if err := client.HandshakeContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	srv := <-accepted
	if srv == nil {
		t.Fatal("no server side")
	}
	t.Cleanup(func() { _ = client.Close(); _ = srv.Close() })
	return client, func() { _ = srv.Close() }
}

// A spare whose server closed it (tpd restarted, or gave up waiting for its
// hello) is seen as closed before a session takes it, and discarded: the
// session gets a new connection, known to be open (a dial that sends its
// first bytes with the hello must never send them into a connection that is
// already gone).
func TestSpareClosedByServerIsDiscarded(t *testing.T) {
	t.Parallel()
	c, closeServer := tlsPair(t)
	if open, known := ConnOpen(c); !open || !known {
		t.Fatalf("an open connection: open %v, known %v; want true, true", open, known)
	}
	closeServer()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) { // polling, bounded
		if open, _ := ConnOpen(c); !open {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a connection its server closed still looks open")
		}
	}

	d, _ := spareEnv(t)
	d.spare.mu.Lock()
	d.spare.conns = append(d.spare.conns, spareConn{conn: c, made: time.Now()})
	d.spare.mu.Unlock()
	got, spare, open, err := d.sessionTLS(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	if got == c || spare || !open {
		t.Fatalf("a session offered only a closed spare got the spare %v (spare %v, known open %v); want a new connection, known open", got == c, spare, open)
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Fatal("the discarded spare was not closed")
	}
}

// Every TLS session of a Client shares one configuration (a connection keeps
// its own for its life, a kilobyte per idle tunnel), made again when the
// Client's TLSConfig or Server changes; it always carries TP's ALPN and TLS 1.3.
func TestSessionConfigShared(t *testing.T) {
	t.Parallel()
	base := &tls.Config{ServerName: "tp.example.org"}
	d := &Client{Server: "127.0.0.1:443", TLSConfig: base}
	a, err := d.sessionConfig()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := d.sessionConfig()
	if a != b {
		t.Fatal("two sessions got configurations of their own")
	}
	if len(a.NextProtos) != 1 || a.NextProtos[0] != wire.ALPN || a.MinVersion != tls.VersionTLS13 || a.ServerName != "tp.example.org" {
		t.Fatalf("session configuration: ALPN %q, min version %x, name %q", a.NextProtos, a.MinVersion, a.ServerName)
	}
	d.TLSConfig = &tls.Config{}
	c, _ := d.sessionConfig()
	if c == a || c.ServerName != "127.0.0.1" {
		t.Fatalf("after a new TLSConfig: same configuration %v, server name %q; want a new one naming 127.0.0.1", c == a, c.ServerName)
	}
	d.Server = "bad address"
	if _, err := d.sessionConfig(); err == nil {
		t.Fatal("a server address without a port gave a configuration")
	}
}
