package proxy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy"
)

// natRelay is a userspace UDP relay standing in for a NAT between a QUIC client
// and the server: the client sends to the relay, which sends on to the server
// from its outside socket and returns the server's packets to the client address
// it heard from last. rebind replaces the outside socket and closes the old one,
// as a NAT that forgot the mapping would: the server then sees the client's
// source port change in the middle of the connection.
type natRelay struct {
	in     *net.UDPConn
	server *net.UDPAddr

	mu     sync.Mutex
	out    *net.UDPConn
	client *net.UDPAddr

	fromServerNew atomic.Int64 // packets from the server on the newest outside socket
}

func startNATRelay(t testing.TB, server string) *natRelay {
	t.Helper()
	in, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	saddr, err := net.ResolveUDPAddr("udp", server)
	if err != nil {
		t.Fatal(err)
	}
	r := &natRelay{in: in, server: saddr}
	r.rebind(t)
	r.fromServerNew.Store(0)
	t.Cleanup(func() {
		_ = in.Close()
		r.mu.Lock()
		_ = r.out.Close()
		r.mu.Unlock()
	})
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, src, err := in.ReadFromUDP(buf)
			if err != nil {
				return
			}
			r.mu.Lock()
			r.client = src
			out := r.out
			r.mu.Unlock()
			_, _ = out.WriteToUDP(buf[:n], r.server)
		}
	}()
	return r
}

func (r *natRelay) addr() string { return r.in.LocalAddr().String() }

// rebind gives the relay a new outside socket (a new source port toward the server).
func (r *natRelay) rebind(t testing.TB) {
	t.Helper()
	out, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	old := r.out
	r.out = out
	r.fromServerNew.Store(0)
	r.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, err := out.Read(buf)
			if err != nil {
				return
			}
			r.mu.Lock()
			client, current := r.client, r.out == out
			r.mu.Unlock()
			if current {
				r.fromServerNew.Add(1)
			}
			if client != nil {
				_, _ = r.in.WriteToUDP(buf[:n], client)
			}
		}
	}()
}

// echoTransfer sends size random bytes through c to the echo destination and
// checks that the same bytes come back; midway (after a third) it calls change,
// unless that is nil.
func echoTransfer(t *testing.T, conn net.Conn, size int64, change func()) {
	t.Helper()
	// Each read and write must make progress within a minute: a transfer that
	// stalls fails, one that is merely slow (a loaded machine, -race) does not.
	c := stallConn{conn, time.Minute}
	var upSum []byte
	var upErr error
	third := make(chan struct{})
	go func() {
		defer close(third)
		h := sha256.New()
		w := io.MultiWriter(c, h)
		if _, upErr = io.CopyN(w, rand.Reader, size/3); upErr != nil {
			return
		}
		third <- struct{}{}
		if _, upErr = io.CopyN(w, rand.Reader, size-size/3); upErr == nil {
			upErr = conn.(interface{ CloseWrite() error }).CloseWrite()
		}
		upSum = h.Sum(nil)
	}()
	done := make(chan struct{})
	var n int64
	var err error
	h := sha256.New()
	go func() {
		defer close(done)
		n, err = io.Copy(h, c)
	}()
	if _, ok := <-third; ok && change != nil {
		change()
	}
	<-third
	<-done
	if upErr != nil {
		t.Fatalf("upload: %v", upErr)
	}
	if err != nil || n != size {
		t.Fatalf("download: %d bytes, %v; want %d", n, err, size)
	}
	if !bytes.Equal(h.Sum(nil), upSum) {
		t.Fatal("checksum of the echoed data differs from what was sent")
	}
}

// stallConn bounds each Read and Write of a connection by stall, not the
// whole transfer: a deadline hit says the transfer stopped moving.
type stallConn struct {
	net.Conn
	stall time.Duration
}

func (s stallConn) Read(p []byte) (int, error) {
	_ = s.Conn.SetReadDeadline(time.Now().Add(s.stall))
	n, err := s.Conn.Read(p)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("nothing arrived for %v: %w", s.stall, err)
	}
	return n, err
}

func (s stallConn) Write(p []byte) (int, error) {
	_ = s.Conn.SetWriteDeadline(time.Now().Add(s.stall))
	n, err := s.Conn.Write(p)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("nothing could be sent for %v: %w", s.stall, err)
	}
	return n, err
}

// TestQUICNATRebinding: the client's source port changes mid-transfer (a NAT
// rebinding, done by a relay); the stream continues and the transfer completes
// with a matching checksum, and the server answers the new address.
func TestQUICNATRebinding(t *testing.T) {
	t.Parallel()
	size := int64(16 << 20)
	if testing.Short() {
		size = 4 << 20
	}
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	relay := startNATRelay(t, q.udpAddr)
	d := q.quicDialer(t)
	d.QUICServer = relay.addr()
	c := dialVia(t, d, "tcp", q.echo)
	echoTransfer(t, c, size, func() { relay.rebind(t) })
	if got := relay.fromServerNew.Load(); got == 0 {
		t.Fatal("no packets from the server reached the new outside port: it did not follow the rebinding")
	}
	if got := q.srv.Stats().QUICMigrations; got != 1 {
		t.Errorf("Stats().QUICMigrations = %d after one rebinding, want 1", got)
	}
}

// TestQUICClientMigration: the client moves its connection to a new socket of its
// own (quic-go's AddPath, Probe, Switch: a new network) mid-transfer; the transfer
// completes with a matching checksum.
func TestQUICClientMigration(t *testing.T) {
	t.Parallel()
	size := int64(16 << 20)
	if testing.Short() {
		size = 4 << 20
	}
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	d := q.quicDialer(t)
	c := dialVia(t, d, "tcp", q.echo)
	conn := dialed(c).(interface{ Conn() *quic.Conn }).Conn()
	before := conn.LocalAddr().String()
	var after string
	echoTransfer(t, c, size, func() {
		udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Error(err)
			return
		}
		after = udp.LocalAddr().String()
		tr := &quic.Transport{Conn: udp}
		t.Cleanup(func() { _ = tr.Close(); _ = udp.Close() })
		path, err := conn.AddPath(tr)
		if err != nil {
			t.Errorf("AddPath: %v", err)
			return
		}
		pctx, pcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer pcancel()
		if err := path.Probe(pctx); err != nil {
			t.Errorf("Probe: %v", err)
			return
		}
		if err := path.Switch(); err != nil {
			t.Errorf("Switch: %v", err)
		}
	})
	// Switch only asks for the move: the connection's own goroutine makes it
	// before it next sends. The server moves to the new address when a
	// packet of the connection's own (not a probe) arrives from it. The
	// transfer may have been all in flight before the switch, so a new
	// stream on the same connection sends one for sure.
	c2 := dialVia(t, d, "tcp", q.echo)
	if dialed(c2).(interface{ Conn() *quic.Conn }).Conn() != conn {
		t.Fatal("the second dial did not reuse the migrated connection")
	}
	quicEcho(t, c2, "after the switch")
	if got := conn.LocalAddr().String(); got != after || got == before {
		t.Fatalf("connection's local address %s after the switch and a new stream; want the new socket's %s (was %s)", got, after, before)
	}
	for deadline := time.Now().Add(10 * time.Second); q.srv.Stats().QUICMigrations == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the server did not count the client's migration within 10s of traffic on the new path")
		}
	}
	if got := q.srv.Stats().QUICMigrations; got != 1 {
		t.Errorf("Stats().QUICMigrations = %d after one switch, want 1", got)
	}
}
