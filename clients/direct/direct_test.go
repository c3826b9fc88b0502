package direct_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/direct"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// relayPair is the two ends of a loopback TCP connection: the relay stream
// through the TP server, as each end sees it.
func relayPair(t testing.TB) (dialerSide, agentSide *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); acc <- c }()
	d, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a := <-acc
	if a == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { d.Close(); a.Close() })
	return d.(*net.TCPConn), a.(*net.TCPConn)
}

type ends struct {
	dialer, agent *direct.Pair
}

// pair opens a pair over a loopback relay; ice says whether the ends may find
// a direct path (loopback host candidates) or only the relay (no candidates
// that reach: ICE runs without loopback).
func pair(t testing.TB, loopback bool) ends {
	t.Helper()
	ca := testpki.New(t)
	relayD, relayA := relayPair(t)
	// Candidates on loopback only; without it, on no interface at all.
	opts := direct.ICEOptions{Loopback: loopback, Interface: func(name string) bool { return loopback && name == "lo" }}
	agentTLS := &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "svc.rev.test")},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool}
	dialTLS := &tls.Config{ServerName: "svc.rev.test", RootCAs: ca.Pool,
		Certificates: []tls.Certificate{ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	agentRes := make(chan *direct.Pair, 1)
	go func() {
		var m [2]byte
		if _, err := io.ReadFull(relayA, m[:]); err != nil || m != [2]byte{direct.Marker, direct.Version} {
			t.Errorf("the agent read %x, %v; want the marker", m, err)
			agentRes <- nil
			return
		}
		p, err := direct.Accept(ctx, relayA, agentTLS)
		if err != nil {
			t.Errorf("accept: %v", err)
		} else {
			p.StartICE(false, opts)
		}
		agentRes <- p
	}()
	d, err := direct.Dial(ctx, relayD, dialTLS, opts)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	a := <-agentRes
	if a == nil {
		t.FailNow()
	}
	t.Cleanup(func() { d.Close(0, ""); a.Close(0, ""); <-d.Done(); <-a.Done() })
	return ends{dialer: d, agent: a}
}

// echoStreams makes the agent echo every stream the dialer opens.
func echoStreams(a *direct.Pair) {
	go func() {
		for {
			s, err := a.Conn.AcceptStream(context.Background())
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(s, s); _ = s.Close() }()
		}
	}()
}

// transfer sends n random bytes through an echoing stream and checks that
// the same bytes come back, in order, and then a clean end.
func transfer(t *testing.T, c *quic.Conn, n int, during func(sent int)) {
	t.Helper()
	s, err := c.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, n)
	_, _ = rand.Read(data)
	want := sha256.Sum256(data)
	errc := make(chan error, 1)
	go func() {
		for off := 0; off < n; off += 64 << 10 {
			end := min(off+64<<10, n)
			if _, err := s.Write(data[off:end]); err != nil {
				errc <- err
				return
			}
			if during != nil {
				during(end)
			}
		}
		errc <- s.Close()
	}()
	h := sha256.New()
	got, err := io.Copy(h, s)
	if err != nil {
		t.Fatalf("reading the echo after %d of %d bytes: %v", got, n, err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("writing: %v", err)
	}
	if got != int64(n) || !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatalf("the echo was %d bytes with another checksum; want %d bytes, the same", got, n)
	}
}

// Two ends that can reach each other move their packets to the direct path:
// the bytes arrive intact, and the relay carries only the start.
func TestPairMovesToTheDirectPath(t *testing.T) {
	e := pair(t, true)
	echoStreams(e.agent)
	waitFor(t, "the dialer sends full-size packets on the direct path", allDirect(e.dialer.Path))
	transfer(t, e.dialer.Conn, 8<<20, nil)
	st := e.dialer.Path.Stats()
	if st.DirectOut == 0 || st.DirectIn == 0 {
		t.Fatalf("nothing went on the direct path: %+v", st)
	}
	if st.RelayOut > st.DirectOut/10 {
		t.Fatalf("the relay carried %d packets against %d direct: %+v", st.RelayOut, st.DirectOut, st)
	}
}

// Without a direct path the relay carries everything, and nothing fails.
func TestPairStaysOnTheRelay(t *testing.T) {
	e := pair(t, false)
	echoStreams(e.agent)
	transfer(t, e.dialer.Conn, 4<<20, nil)
	if st := e.dialer.Path.Stats(); st.DirectOut != 0 || st.RelayOut == 0 {
		t.Fatalf("want everything on the relay: %+v", st)
	}
}

// The relay stream stands for the TP server's consent: when it is cut, the
// pair ends at once and its open streams fail, even on a direct path.
func TestPairEndsWithItsRelay(t *testing.T) {
	e := pair(t, true)
	echoStreams(e.agent)
	waitFor(t, "the dialer sends on the direct path", e.dialer.Path.Direct)
	s, err := e.dialer.Conn.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(s, buf); err != nil {
		t.Fatal(err)
	}
	// The TP server cuts the relayed session (a revoke): here, the relay's
	// TCP connection is reset under the agent.
	e.agent.Path.Close()
	_ = s.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, err = s.Read(buf)
	var ae *quic.ApplicationError
	if !errors.As(err, &ae) {
		t.Fatalf("a read on the direct path after the relay's end gave %v; want the pair's close", err)
	}
	select {
	case <-e.dialer.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the dialer's end did not end with its relay")
	}
}

// allDirect says whether p sends every packet on the direct path: it is up,
// and its probe of full-size packets came through.
func allDirect(p *direct.Path) func() bool {
	return func() bool { return p.Direct() && p.Stats().LargeDirect }
}

func waitFor(t testing.TB, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 20 s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkPairBulk is one stream's throughput over a pair on the direct path
// (loopback), in one process, the agent discarding: what the Path and ICE
// cost on top of QUIC.
func BenchmarkPairBulk(b *testing.B) {
	e := pair(b, true)
	go func() {
		for {
			s, err := e.agent.Conn.AcceptStream(context.Background())
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, s); _ = s.Close() }()
		}
	}()
	waitFor(b, "the dialer sends full-size packets on the direct path", allDirect(e.dialer.Path))
	const size = 64 << 20
	buf := make([]byte, 256<<10)
	b.SetBytes(size)
	for range b.N {
		s, err := e.dialer.Conn.OpenStreamSync(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		for left := size; left > 0; left -= len(buf) {
			if _, err := s.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		_ = s.Close()
		if _, err := io.Copy(io.Discard, s); err != nil {
			b.Fatal(err)
		}
	}
	b.Logf("dialer %+v agent %+v", e.dialer.Path.Stats(), e.agent.Path.Stats())
}

// A burst after a quiet spell stays on the direct path: the packet that went
// last before it (an acknowledgement, which nothing answers) does not make
// the path look dead.
func TestPairBurstAfterQuietStaysDirect(t *testing.T) {
	e := pair(t, true)
	echoStreams(e.agent)
	waitFor(t, "the dialer sends full-size packets on the direct path", allDirect(e.dialer.Path))
	transfer(t, e.dialer.Conn, 1<<20, nil)
	time.Sleep(direct.DeadAfter + 500*time.Millisecond) // quiet: nothing but what QUIC sends by itself
	transfer(t, e.dialer.Conn, 4<<20, nil)
	if st := e.dialer.Path.Stats(); st.ToRelay != 0 || st.RelayOut > 20 {
		t.Fatalf("the dialer went back to the relay after a quiet spell: %+v", st)
	}
}
