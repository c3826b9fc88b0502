package clients

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

const muxTestAddr = "svc.rev.test:22"

// carrierSession opens a session as a dial that may open a carrier does (the
// first dial to the name), on a new relay stream served with hdr.
func (e *attachEnv) carrierSession(t testing.TB, hdr wire.SessionHeader) (net.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	claim := &muxClaim{key: muxTestAddr}
	c, err := e.d.e2eSession(context.WithValue(ctx, muxClaimKey{}, claim), e.stream(t, hdr), muxTestAddr, nil)
	e.d.releaseMux(claim, err)
	return c, err
}

// streamSession opens a session as a later dial does: a stream of the
// carrier the dialer holds; it fails the test when the dialer holds none.
func (e *attachEnv) streamSession(t testing.TB, first []byte) (net.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var early *earlyDial
	if first != nil {
		early = &earlyDial{first: first}
	}
	c, handled, claim, err := e.d.muxDial(ctx, muxTestAddr, early)
	if !handled {
		e.d.releaseMux(claim, errors.New("test"))
		t.Fatal("the dialer holds no carrier to the name")
	}
	return c, err
}

// countServes counts the relay streams the agent served (TP sessions).
func countServes(e *attachEnv) *atomic.Int64 {
	var n atomic.Int64
	e.a.WrapData = func(c net.Conn) net.Conn { n.Add(1); return c }
	return &n
}

// checksummed writes size random bytes through c to the echo service and
// checks that the same bytes come back, and a clean end.
func checksummed(c net.Conn, size int) error {
	data := make([]byte, size)
	_, _ = rand.Read(data)
	want := sha256.Sum256(data)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.(wire.Stream).CloseWrite()
		}
		werr <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		return err
	}
	if err := <-werr; err != nil {
		return err
	}
	if got := h.Sum(nil); n != int64(size) || !bytes.Equal(got, want[:]) {
		return errors.New("the echo differs from what was sent")
	}
	return c.Close()
}

// The first session to a name opens one end-to-end carrier (one relay stream,
// one TLS handshake); every later session, 24 of them at once with 1 MiB each
// way, is a stream of it: no further relay stream, no further handshake, every
// byte back as sent, and a clean end for each.
func TestE2EMuxCarriesManySessions(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	served := countServes(e)
	c, err := e.carrierSession(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*muxStream); !ok {
		t.Fatalf("first session: a %T; want a stream of a carrier", c)
	}
	echoes(t, c, "first")
	var wg sync.WaitGroup
	errs := make(chan error, 24)
	for range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := e.streamSession(t, nil)
			if err == nil {
				err = checksummed(c, 1<<20)
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
	if carriers, streams := e.d.E2EMuxStats(); carriers != 1 || streams != 25 {
		t.Fatalf("%d carriers and %d streams; want 1 and 25", carriers, streams)
	}
	if n := served.Load(); n != 1 {
		t.Fatalf("the agent served %d relay streams; want 1 (the carrier)", n)
	}
	if full, attached := e.d.E2EStats(); full != 1 || attached != 0 {
		t.Fatalf("%d handshakes, %d attaches; want 1 and 0", full, attached)
	}
	// Closing the Dialer ends its carriers: a session still open is cut (an
	// error, never an end of stream), not left to the carrier's idle close.
	open, err := e.streamSession(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.d.Close()
	open.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(open); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a session open when its Dialer closed read %v; want a cut", err)
	}
}

// First bytes go with a stream's opening, sealed inside the carrier: the
// service has them with the agent's checks, and the relay never sees them.
func TestE2EMuxFirstBytes(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	tap := &relayTap{}
	e.a.WrapData = func(c net.Conn) net.Conn { return &relayTapConn{Conn: c, t: tap} }
	c, err := e.carrierSession(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "first")
	secret := "GET /mux-first-bytes HTTP/1.1\r\n\r\n"
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	early := &earlyDial{first: []byte(secret)}
	c, handled, _, err := e.d.muxDial(ctx, muxTestAddr, early)
	if !handled || err != nil {
		t.Fatalf("handled %v, %v", handled, err)
	}
	if !early.sent {
		t.Fatal("the first bytes did not go with the stream's opening")
	}
	readEcho(t, c, secret)
	echoes(t, c, "!")
	if tap.saw([]byte("mux-first-bytes")) {
		t.Fatal("the relay saw first bytes in the clear")
	}
	// As many first bytes as a dial takes (wire.MaxEarlyData): more than one
	// frame holds, the rest follows the opening.
	big := strings.Repeat("0123456789abcdef", wire.MaxEarlyData/16)
	early = &earlyDial{first: []byte(big)}
	c, handled, _, err = e.d.muxDial(ctx, muxTestAddr, early)
	if !handled || err != nil || !early.sent {
		t.Fatalf("handled %v, sent %v, %v", handled, early.sent, err)
	}
	readEcho(t, c, big)
	echoes(t, c, "!")
	e.d.closeMux()
}

// The agent checks every stream: with bob taken out of its allow list
// mid-carrier, the next stream is refused with agent_denied, readable, and the
// carrier stays: put back, bob's next stream is served on the same carrier.
// A dialer whose certificate names another device than the session header
// gets unauthenticated on its first stream, and the carrier ends.
func TestE2EMuxChecksEachStream(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	c, err := e.carrierSession(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "first")
	e.a.SetAllow(nil, []string{"ops"})
	_, err = e.streamSession(t, nil)
	var re *RefusedError
	if !errors.As(err, &re) || re.Code != CodeAgentDenied || !strings.Contains(re.Reason, "bob@phone is not allowed") {
		t.Fatalf("after the allow list changed: %v; want agent_denied", err)
	}
	e.a.SetAllow(nil, []string{"dev"})
	c, err = e.streamSession(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "again")
	if carriers, _ := e.d.E2EMuxStats(); carriers != 1 {
		t.Fatalf("%d carriers; want the refusal to leave the carrier", carriers)
	}
	e.d.closeMux()

	e2 := newAttachEnv(t)
	_, err = e2.carrierSession(t, header("dave@pc", "dev"))
	if !errors.As(err, &re) || re.Code != wire.CodeUnauthenticated {
		t.Fatalf("a carrier whose header names another device: %v; want unauthenticated", err)
	}
}

// An older agent (no tp-e2e-mux/1) serves the session as before, and the
// dialer remembers to dial that name session by session.
func TestE2EMuxOlderAgent(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	e.a.inner.NextProtos = []string{E2EALPN3, E2EALPN2, E2EALPN}
	c, err := e.carrierSession(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*muxStream); ok {
		t.Fatal("a stream of a carrier from an agent that offers none")
	}
	echoes(t, c, "first")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, handled, claim, _ := e.d.muxDial(ctx, muxTestAddr, nil); handled || claim != nil {
		t.Fatalf("handled %v, claim %v; want the name remembered as without carrier", handled, claim)
	}
	c, err = e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*sealedConn); !ok {
		t.Fatalf("second session to an older agent: a %T; want an attached session", c)
	}
	echoes(t, c, "second")
}

// A carrier that breaks (the relay's stream to the agent reset: the agent
// died, tpd cut the session) fails its open streams as cuts, never as an end;
// and a stream the agent aborts (its service reset the connection) reads as a
// cut too, while the carrier's other streams go on.
func TestE2EMuxCutIsError(t *testing.T) {
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
	// The service echoes, but resets a connection whose first byte is R.
	e.a.Exposed[0].Local = testnet.Serve(t, func(c *net.TCPConn) {
		b := make([]byte, 1)
		if _, err := c.Read(b); err != nil {
			return
		}
		if b[0] == 'R' {
			_ = c.SetLinger(0)
			_ = c.Close()
			return
		}
		_, _ = c.Write(b)
		_, _ = io.Copy(c, c)
		_ = c.CloseWrite()
	})
	c, err := e.carrierSession(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	other, err := e.streamSession(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	readEcho(t, other, "ping")

	// The service resets: this stream only.
	reset, err := e.streamSession(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = reset.Write([]byte("R"))
	if _, err := io.ReadAll(reset); !errors.Is(err, wire.ErrTruncated) {
		t.Fatalf("a stream whose service reset: %v; want a cut (%v)", err, wire.ErrTruncated)
	}
	if _, err := other.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	readEcho(t, other, "pong")

	// The carrier breaks: the open stream is cut.
	mu.Lock()
	wire.Abort(raw[0], wire.QUICPeerReset)
	mu.Unlock()
	if _, err := io.ReadAll(other); !errors.Is(err, wire.ErrTruncated) {
		t.Fatalf("a stream of a broken carrier: %v; want a cut (%v)", err, wire.ErrTruncated)
	}
	_ = c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, handled, claim, _ := e.d.muxDial(ctx, muxTestAddr, nil)
		cancel()
		e.d.releaseMux(claim, errors.New("test"))
		if !handled {
			break // the next dial opens a new carrier
		}
		if time.Now().After(deadline) {
			t.Fatal("the dialer still uses the broken carrier")
		}
	}
}

// muxPeer is a raw end of a carrier without TLS, to feed a muxConn bad input.
func muxPeer(t *testing.T, client bool, accept func(*muxStream)) (*muxConn, net.Conn) {
	t.Helper()
	a, b := testnet.Pair(t)
	if accept == nil {
		accept = func(s *muxStream) { go func() { _, _ = io.Copy(io.Discard, s) }() }
	}
	m := newMuxConn(a, client, "svc.rev.test", time.Now().Add(time.Hour), nil, accept)
	t.Cleanup(func() { m.Fail(errors.New("test over")) })
	_ = b.SetDeadline(time.Now().Add(20 * time.Second))
	return m, b
}

// waitUntil polls cond until it holds; what says what did not happen.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("not so after 20s: %s", what)
		}
	}
}

func waitCarrierEnd(t *testing.T, m *muxConn, want string) {
	t.Helper()
	select {
	case <-m.Done():
	case <-time.After(20 * time.Second):
		t.Fatalf("the carrier did not end; want it ended with %q", want)
	}
	if err := m.Err(); err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("the carrier ended with %v; want %q", err, want)
	}
}

// Bad input on a carrier ends it with an error that says what was wrong, at a
// bounded cost: a malformed frame, a dialer beyond the stream limit, data
// beyond a stream's window, a frame for a stream never opened, and a peer
// that goes silent in the middle of a frame.
func TestE2EMuxBadInput(t *testing.T) { // not parallel: it shortens the package's carrier timers
	frame := func(typ byte, id uint32, payload []byte) []byte { return appendMuxFrame(nil, typ, id, payload) }
	for _, tc := range []struct {
		what  string
		input func() []byte
		want  string
	}{
		{"an unknown frame type", func() []byte { return frame(0x7f, 0, nil) }, "frame type 0x7f on stream 0"},
		{"a frame longer than a record", func() []byte {
			return binary.BigEndian.AppendUint16([]byte{muxData, 0, 0, 0, 1}, muxMaxPayload+1)
		}, "a frame of 16378 bytes"},
		{"a WINDOW of 3 bytes", func() []byte { return append(frame(muxOpen, 1, nil), frame(muxWindow, 1, []byte{1, 2, 3})...) }, "a WINDOW of 3 bytes"},
		{"data for a stream never opened", func() []byte { return frame(muxData, 9, []byte("x")) }, "never opened"},
		{"streams opened out of order", func() []byte { return append(frame(muxOpen, 5, nil), frame(muxOpen, 3, nil)...) }, "stream 3 opened after stream 5"},
		// A stream id opened a second time, while its stream is open and after
		// it ended: one id must never name two streams.
		{"a stream id opened again while open", func() []byte { return append(frame(muxOpen, 1, nil), frame(muxOpen, 1, nil)...) }, "stream 1 opened after stream 1"},
		{"a stream id opened again after its stream ended", func() []byte {
			return append(append(frame(muxOpen, 1, nil), frame(muxAbort, 1, []byte{0})...), frame(muxOpen, 1, nil)...)
		}, "stream 1 opened after stream 1"},
		{"more streams than the limit", func() []byte {
			var b []byte
			for i := range MuxMaxStreams + 1 {
				b = append(b, frame(muxOpen, uint32(i+1), nil)...)
			}
			return b
		}, "more than 256 streams"},
		{"data beyond the window", func() []byte {
			b := frame(muxOpen, 1, nil)
			chunk := make([]byte, muxMaxPayload)
			for range muxStreamWindow/muxMaxPayload + 1 {
				b = append(b, frame(muxData, 1, chunk)...)
			}
			return b
		}, "beyond its window"},
		{"data after FIN", func() []byte {
			return append(append(frame(muxOpen, 1, nil), frame(muxFin, 1, nil)...), frame(muxData, 1, []byte("x"))...)
		}, "after its FIN"},
	} {
		t.Run(tc.what, func(t *testing.T) {
			hold := func(s *muxStream) {} // never reads: the window fills
			m, peer := muxPeer(t, false, hold)
			go func() { _, _ = peer.Write(tc.input()) }()
			waitCarrierEnd(t, m, tc.want)
		})
	}

	t.Run("silent in a frame", func(t *testing.T) {
		defer func(d, tick time.Duration) { muxDead, muxTick = d, tick }(muxDead, muxTick)
		muxDead, muxTick = 300*time.Millisecond, 50*time.Millisecond
		m, peer := muxPeer(t, false, nil)
		if _, err := peer.Write([]byte{muxData, 0, 0}); err != nil { // half a header, then nothing
			t.Fatal(err)
		}
		waitCarrierEnd(t, m, "nothing arrived from the dialer")
	})
}

// The dialer never names two streams of a carrier with one id: each stream it
// opens, also after earlier ones ended, takes an id above every earlier one,
// and the agent serves each as a stream of its own.
func TestE2EMuxStreamIDsNotReused(t *testing.T) {
	a, b := testnet.Pair(t)
	got := make(chan *muxStream, 8)
	agent := newMuxConn(a, false, "svc.rev.test", time.Now().Add(time.Hour), nil, func(s *muxStream) { got <- s })
	dialer := newMuxConn(b, true, "svc.rev.test", time.Now().Add(time.Hour), nil, nil)
	t.Cleanup(func() { agent.Fail(errors.New("test over")); dialer.Fail(errors.New("test over")) })
	var last uint32
	open := func() *muxStream {
		t.Helper()
		s, err := dialer.Open([]byte("x"))
		if err != nil {
			t.Fatal(err)
		}
		if s.ID() <= last {
			t.Fatalf("the dialer opened stream %d after stream %d", s.ID(), last)
		}
		last = s.ID()
		select {
		case as := <-got:
			if as.ID() != s.ID() {
				t.Fatalf("the agent was given stream %d for the dialer's %d", as.ID(), s.ID())
			}
			return as
		case <-time.After(10 * time.Second):
			t.Fatalf("the agent was not given the dialer's stream %d", s.ID())
		}
		return nil
	}
	first, _ := open(), open()
	first.Abort(0) // an ended stream: its id stays used
	waitUntil(t, "the dialer saw its first stream end", func() bool { return dialer.Streams() == 1 })
	open()
	open()
	if err := agent.Err(); err != nil {
		t.Fatalf("the carrier ended: %v", err)
	}
}

// A carrier ends when the first of its two certificates expires (the
// dialer's, the agent's), at each end by that end's own clock: the end whose
// clock passes that moment ends the carrier, saying so, though the other end's
// clock has not, and the open stream reads a cut. The ends' clocks are their
// TLS configurations' Time, moved here by hours instead of waited for.
func TestE2EMuxEndsWithCertificates(t *testing.T) {
	defer func(tick time.Duration) { muxTick = tick }(muxTick)
	muxTick = 20 * time.Millisecond
	const agentFor = 4 * time.Hour // testpki's server certificates
	for _, tc := range []struct {
		what      string
		dialerFor time.Duration // how long the dialer's certificate is valid
	}{
		{"the dialer's certificate expires first", time.Hour},
		{"the agent's certificate expires first", 8 * time.Hour},
	} {
		for _, end := range []string{"dialer", "agent"} {
			t.Run(tc.what+", seen by the "+end, func(t *testing.T) {
				e := newAttachEnv(t)
				bob := e.ca.ClientCert(t, "bob@phone", testpki.LeafOptions{NotAfter: time.Now().Add(tc.dialerFor)})
				e.d.TLSConfig.Certificates = []tls.Certificate{bob}
				var ahead atomic.Int64
				clock := func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
				if end == "dialer" {
					e.d.TLSConfig.Time = clock
				} else {
					e.a.inner.Time = clock
				}
				c, err := e.carrierSession(t, header("bob@phone", "dev"))
				if err != nil {
					t.Fatal(err)
				}
				if _, err := c.Write([]byte("open")); err != nil {
					t.Fatal(err)
				}
				readEcho(t, c, "open")
				e.d.mux.mu.Lock()
				m := e.d.mux.carriers[muxTestAddr][0].Conn
				e.d.mux.mu.Unlock()
				if end == "agent" {
					e.a.mu.Lock()
					for am := range e.a.carriers {
						m = am.Conn
					}
					e.a.mu.Unlock()
				}
				// Just past the first expiry, well before the second.
				ahead.Store(int64(min(tc.dialerFor, agentFor) + time.Minute))
				select {
				case <-m.Done():
				case <-time.After(10 * time.Second):
					t.Fatalf("the %s's end of the carrier outlived the certificate that expired first", end)
				}
				if err := m.Err(); err == nil || err.Error() != "a certificate of the end-to-end session expired" {
					t.Fatalf("the %s's end of the carrier ended with %v; want: a certificate expired", end, err)
				}
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadAll(c); !errors.Is(err, wire.ErrTruncated) {
					t.Fatalf("the stream open when the carrier expired read %v; want a cut (%v)", err, wire.ErrTruncated)
				}
			})
		}
	}
}

// A carrier whose dialer opened a stream and went idle ends after
// muxAgentIdle once the stream ended, though the dialer keeps pinging it
// (as a dialer does at every tick): pings keep a carrier alive (it is not
// cut as dead) but do not keep it open.
func TestE2EMuxAgentClosesIdleCarrier(t *testing.T) { // not parallel: it shortens the package's carrier timers
	defer func(i, tick time.Duration) { muxAgentIdle, muxTick = i, tick }(muxAgentIdle, muxTick)
	muxAgentIdle, muxTick = 200*time.Millisecond, 20*time.Millisecond
	m, peer := muxPeer(t, false, func(s *muxStream) { go func() { _, _ = io.Copy(io.Discard, s); _ = s.Close() }() })
	go func() { _, _ = io.Copy(io.Discard, peer) }()
	// The dialer's stream, opened and ended (FIN); the agent ends its side.
	if _, err := peer.Write(append(appendMuxFrame(nil, muxOpen, 1, []byte("x")), appendMuxFrame(nil, muxFin, 1, nil)...)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the agent's end of the stream ended", func() bool { return m.Opened() == 1 && m.Streams() == 0 })
	// Pings, more often than muxAgentIdle, until the carrier ends.
	every := muxTick
	go func() {
		for {
			select {
			case <-m.Done():
				return
			case <-time.After(every):
			}
			if _, err := peer.Write(appendMuxFrame(nil, muxPing, 0, make([]byte, 8))); err != nil {
				return
			}
		}
	}()
	select {
	case <-m.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("a carrier without streams whose dialer only pings was not closed")
	}
	if err := m.Err(); err == nil || err.Error() != "closed" {
		t.Fatalf("the carrier ended with %v; want closed by the agent as idle", err)
	}
}

// benchSink makes e's service a sink that ends its side after the dialer's end.
func benchSink(b *testing.B, e *attachEnv) {
	e.a.Exposed[0].Local = testnet.Serve(b, func(c *net.TCPConn) {
		_, _ = io.Copy(io.Discard, c)
		_ = c.CloseWrite()
	})
}

// bulk sends size bytes through c to the sink and waits for its end.
func bulk(b *testing.B, c net.Conn, size int) {
	buf := make([]byte, 64<<10)
	for sent := 0; sent < size; sent += len(buf) {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := c.(wire.Stream).CloseWrite(); err != nil {
		b.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, c); err != nil {
		b.Fatal(err)
	}
	c.Close()
}

// BenchmarkE2EBulk compares one session's throughput as a stream of a
// carrier with an attached session of its own, on the same loopback relay
// (no tpd): what the multiplexer costs per byte. Figures: the ratio of the
// two in one run.
func BenchmarkE2EBulk(b *testing.B) {
	const size = 64 << 20
	for _, mode := range []string{"attach", "mux"} {
		b.Run(mode, func(b *testing.B) {
			e := newAttachEnv(b)
			benchSink(b, e)
			t := b
			c, err := e.carrierSession(t, header("bob@phone", "dev"))
			if err != nil {
				b.Fatal(err)
			}
			bulk(b, c, 1<<20)
			b.SetBytes(size)
			b.ResetTimer()
			for range b.N {
				var c net.Conn
				if mode == "mux" {
					c, err = e.streamSession(t, nil)
				} else {
					c, err = e.session(t, header("bob@phone", "dev"))
				}
				if err != nil {
					b.Fatal(err)
				}
				bulk(b, c, size)
			}
			b.StopTimer()
			e.d.closeMux()
		})
	}
}

// A stream whose reader keeps up grows its window beyond the first 256 KiB
// (so one stream is not capped by the relay's round trip), within the
// carrier's budget, which it gives back when it ends.
func TestE2EMuxWindowGrows(t *testing.T) { // not parallel: it changes the package's window growth timing
	defer func(w time.Duration) { muxGrowWithin = w }(muxGrowWithin)
	muxGrowWithin = time.Hour // every grant counts as quick: no dependence on the machine's speed
	a, b := testnet.Pair(t)
	got := make(chan *muxStream, 1)
	agent := newMuxConn(a, false, "svc.rev.test", time.Now().Add(time.Hour), nil, func(s *muxStream) { got <- s })
	dialer := newMuxConn(b, true, "svc.rev.test", time.Now().Add(time.Hour), nil, nil)
	t.Cleanup(func() { agent.Fail(errors.New("test over")); dialer.Fail(errors.New("test over")) })
	s, err := dialer.Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		buf := make([]byte, 64<<10)
		for range 256 { // 16 MiB
			if _, err := s.Write(buf); err != nil {
				return
			}
		}
		_ = s.CloseWrite()
	}()
	as := <-got
	n, err := io.Copy(io.Discard, as)
	if err != nil || n != 16<<20 {
		t.Fatalf("read %d bytes, %v; want 16 MiB and a clean end", n, err)
	}
	win := as.Window()
	if win <= muxStreamWindow || win > muxMaxStreamWindow {
		t.Fatalf("the window is %d bytes after 16 MiB read at once; want it grown, at most %d", win, muxMaxStreamWindow)
	}
	_ = as.Close()
	if g := agent.Grown(); g != 0 {
		t.Fatalf("%d bytes of growth still taken after the stream ended", g)
	}
}

// When the server the carrier runs through stops (the agent's control session
// ended with "shutdown"), the agent sends GOAWAY: the dialer opens no further
// stream on the carrier, the stream still open finishes, and the carrier ends
// with it, so it does not hold up the server's drain.
func TestE2EMuxDrains(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	c, err := e.carrierSession(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("before")); err != nil {
		t.Fatal(err)
	}
	readEcho(t, c, "before")
	e.d.mux.mu.Lock()
	m := e.d.mux.carriers[muxTestAddr][0]
	e.d.mux.mu.Unlock()
	e.a.drainCarriers()
	waitUsable := time.Now().Add(10 * time.Second)
	for m.Usable(time.Now()) {
		if time.Now().After(waitUsable) {
			t.Fatal("the dialer still opens streams on a carrier told to go away")
		}
		time.Sleep(10 * time.Millisecond)
	}
	echoes(t, c, " and after") // the open stream finishes
	select {
	case <-m.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the carrier did not end with its last stream")
	}
	if err := m.Err(); err == nil || (err.Error() != "closed" && err.Error() != "the agent closed the carrier") {
		t.Fatalf("the carrier ended with %v; want a clean close (by either end)", err)
	}
}

// Streams count against the agent's bound on sessions (MaxSessions): beyond
// it a stream is refused, readably, with reverse_busy, and the carrier stays.
func TestE2EMuxAgentBound(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	e.a.MaxSessions = 2
	c1, err := e.carrierSession(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	c2, err := e.streamSession(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.streamSession(t, nil)
	var re *RefusedError
	if !errors.As(err, &re) || re.Code != wire.CodeReverseBusy || !strings.Contains(re.Reason, "as many sessions as it takes (2)") {
		t.Fatalf("a third stream with MaxSessions 2: %v; want reverse_busy", err)
	}
	echoes(t, c1, "one")
	echoes(t, c2, "two")
	deadline := time.Now().Add(10 * time.Second)
	for { // the agent counts a stream down when its goroutine is done
		c3, err := e.streamSession(t, nil)
		if err == nil {
			echoes(t, c3, "three")
			break
		}
		if !errors.As(err, &re) || re.Code != wire.CodeReverseBusy || time.Now().After(deadline) {
			t.Fatalf("after two streams ended: %v", err)
		}
	}
	e.d.closeMux()
}

// FuzzMuxFrames: an agent's end of a carrier stays within its bounds on any
// input from the dialer (the bad input: any bytes at all): it ends at the end
// of the input without a panic, holds no stream after, and keeps the
// multiplexer's promises. Every stream it serves was opened in the input, once
// (ids only grow); a stream reads, in order, a prefix of what the input sent
// it before its FIN or ABORT and nothing after; it reads a clean end only
// after a FIN, with all its bytes; windows stay within their bounds.
func FuzzMuxFrames(f *testing.F) {
	frame := func(typ byte, id uint32, payload []byte) []byte { return appendMuxFrame(nil, typ, id, payload) }
	f.Add(frame(muxOpen, 1, []byte("hello")))
	f.Add(append(append(frame(muxOpen, 1, nil), frame(muxData, 1, []byte("x"))...), frame(muxFin, 1, nil)...))
	f.Add(append(frame(muxOpen, 1, nil), frame(muxAbort, 1, []byte{0})...))
	f.Add(append(frame(muxOpen, 1, nil), frame(muxWindow, 1, []byte{0, 0, 1, 0})...))
	f.Add(frame(muxPing, 0, make([]byte, 8)))
	f.Add([]byte{muxData, 0, 0, 0, 1, 0xff, 0xff})
	f.Add(append(frame(muxOpen, 1, []byte("a")), frame(muxOpen, 1, []byte("b"))...))
	f.Add(append(append(frame(muxOpen, 1, []byte("a")), frame(muxFin, 1, nil)...), frame(muxData, 1, []byte("late"))...))
	f.Add(append(append(append(frame(muxOpen, 2, []byte("a")), frame(muxAbort, 2, []byte{0})...), frame(muxData, 2, []byte("late"))...), frame(muxOpen, 3, nil)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		// What the input sends each stream: OPEN's and DATA's payloads until
		// its first FIN or ABORT (whether the carrier lives that long or not).
		type sent struct {
			data []byte
			fin  bool // a FIN ended it, before any ABORT
			over bool
		}
		model := map[uint32]*sent{}
		for b := in; len(b) >= muxHeaderLen; {
			typ, id, n := b[0], binary.BigEndian.Uint32(b[1:5]), int(binary.BigEndian.Uint16(b[5:7]))
			if n > muxMaxPayload || len(b) < muxHeaderLen+n {
				break
			}
			p := b[muxHeaderLen : muxHeaderLen+n]
			b = b[muxHeaderLen+n:]
			st := model[id]
			switch {
			case typ == muxOpen && st == nil:
				model[id] = &sent{data: bytes.Clone(p)}
			case st == nil || st.over:
			case typ == muxData:
				st.data = append(st.data, p...)
			case typ == muxFin:
				st.fin, st.over = true, true
			case typ == muxAbort:
				st.over = true
			}
		}

		type served struct {
			id    uint32
			data  []byte
			clean bool
			win   int
		}
		check := func(t *testing.T, slow bool) {
			var (
				gate    = make(chan struct{}) // the readers start
				mu      sync.Mutex
				streams []*served
				readers sync.WaitGroup
			)
			if !slow {
				close(gate)
			}
			a, b := net.Pipe()
			m := newMuxConn(a, false, "svc.rev.test", time.Now().Add(time.Hour), nil, func(s *muxStream) {
				sv := &served{id: s.ID()}
				mu.Lock()
				streams = append(streams, sv)
				mu.Unlock()
				readers.Add(1)
				go func() {
					defer readers.Done()
					<-gate
					data, err := io.ReadAll(s)
					mu.Lock()
					sv.data, sv.clean, sv.win = data, err == nil, s.Window()
					mu.Unlock()
					_ = s.Close()
				}()
			})
			go func() { _, _ = io.Copy(io.Discard, b) }() // what the agent answers
			_, _ = b.Write(in)
			_ = b.Close()
			select {
			case <-m.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("the carrier did not end at the end of its input")
			}
			if slow {
				close(gate)
			}
			// The streams it served (accept runs before the carrier ends).
			var last uint32
			for _, sv := range streams {
				if sv.id <= last {
					t.Fatalf("the agent served stream %d after stream %d", sv.id, last)
				}
				last = sv.id
				if model[sv.id] == nil {
					t.Fatalf("the agent served stream %d, which the input never opened", sv.id)
				}
			}
			ended := make(chan struct{})
			go func() { readers.Wait(); close(ended) }()
			select {
			case <-ended:
			case <-time.After(10 * time.Second):
				t.Fatal("a stream the agent served did not end with the carrier: its reader still waits")
			}
			if n := m.Streams(); n != 0 {
				t.Fatalf("%d streams held after the carrier ended", n)
			}
			if g := m.Grown(); g < 0 || g > muxGrowBudget {
				t.Fatalf("window growth %d outside the carrier's budget (0..%d)", g, muxGrowBudget)
			}
			for _, sv := range streams {
				st := model[sv.id]
				if !bytes.HasPrefix(st.data, sv.data) {
					t.Fatalf("stream %d read %q; the input sent it %q", sv.id, sv.data, st.data)
				}
				if sv.clean && (!st.fin || !bytes.Equal(sv.data, st.data)) {
					t.Fatalf("stream %d read a clean end after %q; the input sent %q, FIN %v", sv.id, sv.data, st.data, st.fin)
				}
				if sv.win < muxStreamWindow || sv.win > muxMaxStreamWindow {
					t.Fatalf("stream %d's window is %d bytes; want %d..%d", sv.id, sv.win, muxStreamWindow, muxMaxStreamWindow)
				}
			}
			if int64(len(streams)) != m.Opened() {
				t.Fatalf("the agent served %d streams and counts %d opened", len(streams), m.Opened())
			}
		}
		// Each input twice: with readers that keep up, and with readers that
		// start only once the carrier ended (all of the input was handled
		// before any byte was read: what a stream holds is then all it got).
		for _, slow := range []bool{false, true} {
			check(t, slow)
		}
	})
}

// A destination that answers without end-to-end TLS (no protected name) is
// remembered after its first dial: later dials do not try to open a carrier
// to it, and no carrier is ever made.
func TestE2EMuxPlainDestinationRemembered(t *testing.T) {
	t.Parallel()
	addr, cfg := StartTestServer(t, nil)
	d := &Dialer{Server: addr, TLSConfig: cfg, Transport: TransportTLS}
	defer d.Close()
	echo := testnet.Echo(t)
	for range 2 {
		c, err := d.DialContext(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatal(err)
		}
		echoes(t, c, "plain")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, handled, claim, _ := d.muxDial(ctx, echo, nil); handled || claim != nil {
		t.Fatalf("handled %v, claim %v; want the plain destination remembered", handled, claim)
	}
	if carriers, streams := d.E2EMuxStats(); carriers != 0 || streams != 0 {
		t.Fatalf("%d carriers, %d streams to a plain destination", carriers, streams)
	}
}
