package clients

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// attachEnv is an agent for svc.rev.test (allow list: group dev) in front of an
// echo service, and bob's dialer; the test plays the relay: each session is a
// real loopback TCP connection whose one end the dialer gets and whose other end
// a.serve gets with the session header the test chooses.
type attachEnv struct {
	a      *Agent
	d      *Dialer
	ca     *testpki.CA // issued both ends' certificates
	served sync.WaitGroup
	// answered is what the agent calls when a session has its first answer
	// (for an accept over TLS: refill the spare connection); may be nil.
	answered func()
}

func newAttachEnv(t testing.TB) *attachEnv {
	t.Helper()
	ca := testpki.New(t)
	agentCert := ca.ServerCert(t, "svc.rev.test")
	bob := ca.ClientCert(t, "bob@phone", testpki.LeafOptions{})
	a := &Agent{
		Dialer:      &Dialer{TLSConfig: &tls.Config{RootCAs: ca.Pool}},
		Exposed:     []Exposed{{Name: "svc", Local: testnet.Echo(t)}},
		AllowGroups: []string{"dev"},
		Certificate: func(context.Context, string) (*tls.Certificate, error) { return &agentCert, nil },
		full:        map[string]string{"svc": "svc.rev.test"},
	}
	a.setupInner()
	e := &attachEnv{a: a, ca: ca, d: &Dialer{TLSConfig: &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{bob}}}}
	t.Cleanup(e.served.Wait)
	return e
}

// header is what TP's server announces for bob@phone in groups.
func header(peer string, groups ...string) wire.SessionHeader {
	return wire.SessionHeader{V: 1, Session: "01", Name: "svc", PeerID: peer, PeerGroups: groups}
}

// sessionLife bounds the whole life of a session stream makes (the agent's
// serve and the dialer end's deadline): a guard against a hang, not a measure
// of speed. Under the race detector on a machine busy compiling, the 24
// sessions of 1 MiB each way that one carrier holds in
// TestE2EMuxCarriesManySessions took over 20 s, and the agent's cut carrier
// failed the test.
const sessionLife = 2 * time.Minute

// stream returns the dialer's end of a new session whose agent end a.serve runs
// with hdr.
func (e *attachEnv) stream(t testing.TB, hdr wire.SessionHeader) net.Conn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	agentEnd, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	e.served.Add(1)
	go func() {
		defer e.served.Done()
		ctx, cancel := context.WithTimeout(context.Background(), sessionLife)
		defer cancel()
		e.a.serve(ctx, agentEnd.(*net.TCPConn), hdr, e.answered)
	}()
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(sessionLife))
	return c
}

// session opens a session as the dialer does after the server's e2e ok.
func (e *attachEnv) session(t testing.TB, hdr wire.SessionHeader) (net.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return e.d.e2eSession(ctx, e.stream(t, hdr), "svc.rev.test:22", nil)
}

// echoes checks that c carries msg to the echo service and back, and ends cleanly.
func echoes(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	if err := c.(wire.Stream).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != msg {
		t.Fatalf("echo: %q, %v; want %q and a clean end", got, err, msg)
	}
	c.Close()
}

// A second session of the same dialer to the same agent attaches to the first's
// end-to-end state instead of running a TLS handshake, and carries bytes both
// ways with half-close; so does a third, with a larger write.
func TestE2EAttachReusesState(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	c, err := e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*transport.BatchedTLS); !ok {
		t.Fatalf("the first session is a %T; want the inner TLS session", c)
	}
	echoes(t, c, "first")
	for i, msg := range []string{"second", string(bytes.Repeat([]byte("x"), 3*sealedMaxPlain+5))} {
		c, err := e.session(t, header("bob@phone", "dev"))
		if err != nil {
			t.Fatalf("session %d: %v", i+2, err)
		}
		if _, ok := c.(*sealedConn); !ok {
			t.Fatalf("session %d is a %T; want an attached session", i+2, c)
		}
		echoes(t, c, msg)
	}
	if full, attached := e.d.E2EStats(); full != 1 || attached != 2 {
		t.Fatalf("%d full handshakes and %d attaches; want 1 and 2", full, attached)
	}
}

// The agent checks every attached session as it checks one after a handshake.
// Bad input: the relay announces another device (dave@pc) for a session that
// attaches with bob's state (as if dave held it); and bob after the relay
// stopped listing him in group dev.
func TestE2EAttachChecksEachSession(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	c, err := e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "first")
	for _, tc := range []struct {
		what string
		hdr  wire.SessionHeader
		code string
	}{
		{"another device announced", header("dave@pc", "dev"), wire.CodeUnauthenticated},
		{"bob no longer in group dev", header("bob@phone"), CodeAgentDenied},
	} {
		_, err := e.session(t, tc.hdr)
		var re *RefusedError
		if !errors.As(err, &re) || re.Code != tc.code {
			t.Fatalf("%s: %v; want the agent's %s", tc.what, err, tc.code)
		}
	}
	if full, attached := e.d.E2EStats(); full != 1 || attached != 0 {
		t.Fatalf("%d full handshakes and %d attaches; want the refusals to come from attached sessions (1, 0)", full, attached)
	}
	// The refusals did not cost the state: bob in dev attaches again.
	c, err = e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*sealedConn); !ok {
		t.Fatalf("after the refusals: a %T; want an attached session", c)
	}
	echoes(t, c, "again")
}

// A recorded attach replayed on a new stream (the relay sees it in the clear)
// is never accepted: the agent asks for a TLS handshake instead, and the echo
// service behind it sees nothing of the replay. An attach whose proof record
// was altered is aborted.
func TestE2EAttachRefusesReplayAndForgery(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	c, err := e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "first")
	st := e.d.e2e.get("svc.rev.test")
	if st == nil {
		t.Fatal("no attach state after a tp-e2e/2 session")
	}
	n, _ := st.take(time.Now())
	c2s, _, err := attachKeys(st.secret, st.id, n)
	if err != nil {
		t.Fatal(err)
	}
	msg := attachMessage(st.id, n, c2s, attachVersion, nil)
	first := e.stream(t, header("bob@phone", "dev"))
	if _, err := first.Write(msg); err != nil {
		t.Fatal(err)
	}
	answer := make([]byte, 1)
	if _, err := io.ReadFull(first, answer); err != nil || answer[0] != attachAccepted {
		t.Fatalf("the original attach: %x, %v; want it accepted", answer, err)
	}
	first.Close()

	replay := e.stream(t, header("bob@phone", "dev"))
	if _, err := replay.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(replay, answer); err != nil || answer[0] != attachFallback {
		t.Fatalf("the replayed attach: %x, %v; want 0x%02x (a TLS handshake first)", answer, err, attachFallback)
	}
	replay.Close()

	n, _ = st.take(time.Now())
	c2s, _, _ = attachKeys(st.secret, st.id, n)
	forged := attachMessage(st.id, n, c2s, attachVersion, nil)
	forged[len(forged)-1] ^= 1
	f := e.stream(t, header("bob@phone", "dev"))
	if _, err := f.Write(forged); err != nil {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(f); err == nil || len(got) != 0 {
		t.Fatalf("the forged attach: read %x, %v; want an abort and nothing else", got, err)
	}
}

// An agent that does not know the state (it restarted) asks for a handshake,
// which runs on the same stream: the session works and renews the state.
func TestE2EAttachFallsBackToHandshake(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	c, err := e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "first")
	e.a.attaches = agentAttaches{} // a restarted agent
	c, err = e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*transport.BatchedTLS); !ok {
		t.Fatalf("after the agent forgot the state: a %T; want a TLS session", c)
	}
	echoes(t, c, "second")
	c, err = e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*sealedConn); !ok {
		t.Fatalf("third session: a %T; want it attached to the renewed state", c)
	}
	echoes(t, c, "third")
	if full, attached := e.d.E2EStats(); full != 2 || attached != 1 {
		t.Fatalf("%d full handshakes and %d attaches; want 2 and 1", full, attached)
	}
}

// The replay window: each number once, reordering within the window, nothing
// older than the window.
func TestAttachClaimWindow(t *testing.T) {
	t.Parallel()
	now := time.Now()
	s := &agentAttach{expires: now.Add(time.Hour), used: now}
	for _, tc := range []struct {
		n  uint64
		ok bool
	}{
		{1, true}, {1, false}, {3, true}, {2, true}, {2, false}, {3, false},
		{200, true}, {70, true}, {70, false}, {1 + attachWindow + 3, true}, {4, false}, {5000, true},
		{5000 - attachWindow + 1, true}, {5000 - attachWindow, false}, {4999, true}, {4999, false},
	} {
		if got := s.claim(tc.n, now); got != tc.ok {
			t.Fatalf("claim(%d) = %v; want %v", tc.n, got, tc.ok)
		}
	}
	s.used = now.Add(-attachIdle)
	if s.claim(6000, now) {
		t.Fatal("an idle state accepted an attach")
	}
}

// Over either carrier a dialer that holds attach state sends the attach with
// its dial hello, before the server's ok. Bad input: a server (played by the
// test) that answers ok without "e2e", as when the name's agent now exposes it
// publicly: the dialer fails the dial, aborts the stream (RESET_STREAM 0x1 over
// QUIC, a TCP reset over TLS: its attach must not be taken for the start of a
// public session) and forgets the state.
func TestEarlyAttachToPublicNameAborts(t *testing.T) {
	t.Parallel()
	for _, transport := range []string{TransportQUIC, TransportTLS} {
		t.Run(transport, func(t *testing.T) { testEarlyAttachToPublicNameAborts(t, transport) })
	}
}

func testEarlyAttachToPublicNameAborts(t *testing.T, transport string) {
	ca := testpki.New(t)
	srvCfg := &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "localhost", "127.0.0.1")}, NextProtos: []string{wire.ALPN}, MinVersion: tls.VersionTLS13}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	accepted := make(chan net.Conn, 1)
	var server string
	if transport == TransportQUIC {
		ln, err := quic.ListenAddr("127.0.0.1:0", srvCfg, &quic.Config{})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		server = ln.Addr().String()
		go func() {
			c, err := ln.Accept(ctx)
			if err != nil {
				return
			}
			if str, err := c.AcceptStream(ctx); err == nil {
				accepted <- wire.NewQUICStream(c, str)
			}
		}()
	} else {
		ln, err := tls.Listen("tcp", "127.0.0.1:0", srvCfg)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		server = ln.Addr().String()
		go func() {
			if c, err := ln.Accept(); err == nil {
				accepted <- c
			}
		}()
	}
	d := &Dialer{Server: server, Transport: transport, Timeout: 10 * time.Second,
		TLSConfig: &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{ca.ClientCert(t, "bob@phone", testpki.LeafOptions{})}}}
	defer d.Close()
	st := &dialerAttach{secret: bytes.Repeat([]byte{7}, 32), expires: time.Now().Add(time.Hour), used: time.Now()}
	d.e2e.put("svc.rev.test", st)
	dialed := make(chan error, 1)
	go func() {
		c, err := d.DialContext(ctx, "tcp", "svc.rev.test:22")
		if err == nil {
			c.Close()
		}
		dialed <- err
	}()
	var relay net.Conn
	select {
	case relay = <-accepted:
	case <-ctx.Done():
		t.Fatal("the dialer sent no request")
	}
	defer relay.Close()
	_ = relay.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := wire.ReadClientHello(relay); err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, attachMsgLen)
	if _, err := io.ReadFull(relay, msg); err != nil || msg[0] != attachMarker {
		t.Fatalf("before the ok: %x, %v; want the attach sent with the hello", msg, err)
	}
	if err := wire.WriteServerHello(relay, wire.ServerHello{V: 1, OK: true, Session: "0123456789abcdef0123456789abcdef"}); err != nil {
		t.Fatal(err)
	}
	if err := <-dialed; err == nil || !strings.Contains(err.Error(), "no longer protected") {
		t.Fatalf("dial: %v; want it failed as no longer protected", err)
	}
	_, err := io.Copy(io.Discard, relay)
	if transport == TransportQUIC {
		if code, reset := wire.StreamResetCode(err); !reset || code != wire.QUICInternal {
			t.Fatalf("the server saw %v; want RESET_STREAM 0x1", err)
		}
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the server saw %v; want a TCP reset", err)
	}
	if d.e2e.get("svc.rev.test") != nil {
		t.Fatal("the dialer kept the state of a name that is no longer protected")
	}
}

// An attached session whose stream ends without the close record (the agent
// process died; the relay passed on a plain end) is a cut for the dialer, never
// a clean end. Bad input: the agent's end of the stream half-closed (FIN) in the
// middle of a reply, below the sealed records.
func TestE2EAttachCutIsError(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	var mu sync.Mutex
	var raw []net.Conn
	e.a.WrapData = func(c net.Conn) net.Conn {
		mu.Lock()
		raw = append(raw, c)
		mu.Unlock()
		return c
	}
	c, err := e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "first")
	c, err = e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*sealedConn); !ok {
		t.Fatalf("second session: a %T; want an attached session", c)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	_ = raw[len(raw)-1].(*net.TCPConn).CloseWrite() // a FIN, no close record
	mu.Unlock()
	_, err = io.ReadAll(c)
	if !errors.Is(err, wire.ErrTruncated) {
		t.Fatalf("after the agent's stream ended without a close record: %v; want %v", err, wire.ErrTruncated)
	}
}
