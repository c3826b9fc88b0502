package proxy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// muxClientOptions are a tp-mux/1 client's bounds, as docs/PROTOCOL.md
// section 9.9 gives them.
func muxClientOptions() mux.Options {
	return mux.Options{Client: true, Label: "tp-mux connection", StreamLabel: "tp-mux stream", Peer: "server",
		MaxStreams: wire.MuxMaxStreams, MaxPayload: wire.MuxMaxPayload, SendPayload: wire.MuxMaxPayload,
		StreamWindow: wire.MuxStreamWindow, MaxStreamWindow: wire.MuxMaxStreamWindow, AbortCodes: true}
}

// wantCutCode checks that err is a cut whose ABORT carried code (section
// 6.1), read as a QUIC stream reset with that code reads.
func wantCutCode(t *testing.T, err error, code quic.ApplicationErrorCode) {
	t.Helper()
	got, ok := wire.StreamResetCode(err)
	if !errors.Is(err, wire.ErrTruncated) || !ok || got != code {
		t.Fatalf("the cut read %v (code %v, %v); want a cut with code %s", err, got, ok, wire.EndName(code))
	}
}

// muxConn opens a TLS connection offering tp-mux/1 before tp/1 and runs the
// multiplexer's client end on it: the protocol spoken by hand.
func (e *env) muxConn(t testing.TB) (*mux.Conn, *tls.Conn) {
	t.Helper()
	cfg := e.clientTLS(&e.cert)
	cfg.NextProtos = []string{wire.ALPNMux, wire.ALPN}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if p := c.ConnectionState().NegotiatedProtocol; p != wire.ALPNMux {
		t.Fatalf("negotiated %q; want the server to prefer %s", p, wire.ALPNMux)
	}
	m := mux.New(c, muxClientOptions(), nil)
	t.Cleanup(func() { m.Fail(errors.New("test over")) })
	return m, c
}

// muxDial opens a stream on m carrying a dial hello for addr and returns it
// with the server's answer.
func muxDial(t testing.TB, m *mux.Conn, addr string) (*mux.Stream, wire.ServerHello) {
	t.Helper()
	var hb bytes.Buffer
	if err := wire.WriteClientHello(&hb, dialHello(t.(*testing.T), addr)); err != nil {
		t.Fatal(err)
	}
	st, err := m.Open(hb.Bytes()) // the hello goes with the stream's opening
	if err != nil {
		t.Fatal(err)
	}
	_ = st.SetDeadline(time.Now().Add(20 * time.Second))
	sh, err := wire.ReadServerHello(st)
	if err != nil {
		t.Fatalf("reading the server's answer on a tp-mux stream: %v", err)
	}
	return st, sh
}

// echoChecksum sends size random bytes through st to the echo destination,
// ends its direction (half-close), and checks that the same bytes and then a
// clean end come back. Each read and write must make progress within a
// minute: many streams at once on a loaded machine are slow, not stalled.
func echoChecksum(st wire.Stream, size int) error {
	data := make([]byte, size)
	_, _ = rand.Read(data)
	want := sha256.Sum256(data)
	c := stallConn{st, time.Minute}
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = st.CloseWrite()
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
	if n != int64(size) || !bytes.Equal(h.Sum(nil), want[:]) {
		return errors.New("the echo differs from what was sent")
	}
	return st.Close()
}

// Many sessions on one tp-mux/1 connection: 40 streams at once, each a dial
// checked and answered on its own, 512 KiB each way with half-close, every
// byte back as sent; the server saw one TLS connection (one handshake).
func TestTLSMuxManySessionsOneConnection(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	m, _ := e.muxConn(t)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, sh := muxDial(t, m, e.echo)
			if !sh.OK || sh.Session == "" {
				errs <- errors.New("refused: " + sh.Reason)
				return
			}
			errs <- echoChecksum(st, 512<<10)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := e.srv.Stats().ProxyConns["tls"]; n != 1 {
		t.Fatalf("the server counted %d proxy connections; want 1 for 40 sessions", n)
	}
	if got := m.Opened(); got != 40 {
		t.Fatalf("%d streams opened; want 40", got)
	}
}

// A client that offers only tp/1 (an older tp) is served as before: one
// session per connection.
func TestTLSMuxOlderClientUnchanged(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	c := e.rawConn(t)
	if p := c.ConnectionState().NegotiatedProtocol; p != wire.ALPN {
		t.Fatalf("negotiated %q; want %s for a client offering only it", p, wire.ALPN)
	}
	sh := mustHello(t, c, dialHello(t, e.echo))
	if !sh.OK {
		t.Fatalf("refused: %+v", sh)
	}
	if err := echoChecksum(c, 64<<10); err != nil {
		t.Fatal(err)
	}
}

// A refusal is readable on its stream while the connection's other streams
// go on: the policy denies one destination, and a session to another one,
// open before and after, still echoes.
func TestTLSMuxRefusalPerStream(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) {
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			if req.Destination.Port == 9 {
				return authz.Decision{Reason: "port 9 is closed to alice"}, nil
			}
			return allowAll(ctx, req)
		})
	})
	m, _ := e.muxConn(t)
	open, sh := muxDial(t, m, e.echo)
	if !sh.OK {
		t.Fatalf("refused: %+v", sh)
	}
	if _, err := open.Write([]byte("before")); err != nil {
		t.Fatal(err)
	}
	st, sh := muxDial(t, m, "127.0.0.1:9")
	wantRefusal(t, sh, wire.CodePolicyDenied, "port 9 is closed to alice")
	_ = st.Close()
	if b := make([]byte, 6); func() error { _, err := io.ReadFull(open, b); return err }() != nil || string(b) != "before" {
		t.Fatalf("the open stream's echo: %q", b)
	}
	if err := echoChecksum(open, 1000); err != nil {
		t.Fatal(err)
	}
	again, sh := muxDial(t, m, e.echo)
	if !sh.OK {
		t.Fatalf("after a refusal: %+v", sh)
	}
	if err := echoChecksum(again, 4096); err != nil {
		t.Fatal(err)
	}
	if m.Ended() {
		t.Fatalf("the connection ended: %v", m.Err())
	}
}

// Each stream is a session of the identity: with MaxSessionsPerIdentity 3,
// the fourth stream is refused with too_many_sessions, readable, and after
// one ends another is served on the same connection.
func TestTLSMuxIdentityLimitCountsStreams(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) { c.MaxSessionsPerIdentity = 3 })
	m, _ := e.muxConn(t)
	var open []*mux.Stream
	for range 3 {
		st, sh := muxDial(t, m, e.echo)
		if !sh.OK {
			t.Fatalf("refused: %+v", sh)
		}
		open = append(open, st)
	}
	_, sh := muxDial(t, m, e.echo)
	wantRefusal(t, sh, proxy.CodeTooManySessions, "alice@laptop")
	if err := echoChecksum(open[0], 100); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for { // the server gives the slot back when the session's goroutine is done
		st, sh := muxDial(t, m, e.echo)
		if sh.OK {
			if err := echoChecksum(st, 100); err != nil {
				t.Fatal(err)
			}
			break
		}
		if sh.Code != proxy.CodeTooManySessions || time.Now().After(deadline) {
			t.Fatalf("after a session ended: %+v", sh)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A destination's reset reaches the client's stream as a cut (never an end
// of stream), and the connection's other stream goes on.
func TestTLSMuxDestinationResetIsCut(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	dest := destination(t, func(c *net.TCPConn) {
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			return
		}
		_, _ = c.Write(bytes.Repeat([]byte("d"), 100<<10))
		reset(c)
	})
	m, _ := e.muxConn(t)
	other, sh := muxDial(t, m, e.echo)
	if !sh.OK {
		t.Fatalf("refused: %+v", sh)
	}
	st, sh := muxDial(t, m, dest)
	if !sh.OK {
		t.Fatalf("refused: %+v", sh)
	}
	if _, err := st.Write([]byte("g")); err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, st)
	if err == nil || !errors.Is(err, wire.ErrTruncated) {
		t.Fatalf("read %d bytes, then %v; want a cut (%v)", n, err, wire.ErrTruncated)
	}
	wantCutCode(t, err, wire.QUICPeerReset)
	if err := echoChecksum(other, 64<<10); err != nil {
		t.Fatal(err)
	}
}

// A policy change and a revocation cut the open streams (the live re-check),
// each a cut the client can ask about ("why"), while the connection stays for
// later streams.
func TestTLSMuxRecheckCutsStreams(t *testing.T) {
	t.Parallel()
	var deny, revoked atomic.Bool
	e := newEnv(t, func(c *proxy.Config) {
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			if deny.Load() {
				return authz.Decision{Reason: "db is closed for maintenance"}, nil
			}
			return allowAll(ctx, req)
		})
		c.Identify = func(cs tls.ConnectionState) (authz.Identity, error) {
			if revoked.Load() {
				return authz.Identity{}, errors.New("device alice@laptop is revoked")
			}
			return identifyCN(cs)
		}
	})
	m, _ := e.muxConn(t)
	for _, tc := range []struct {
		name  string
		flag  *atomic.Bool
		code  string
		abort quic.ApplicationErrorCode
	}{{"policy", &deny, wire.EndPolicyChanged, wire.QUICPolicyChanged}, {"revoked", &revoked, wire.EndRevoked, wire.QUICRevoked}} {
		t.Run(tc.name, func(t *testing.T) {
			st, sh := muxDial(t, m, e.echo)
			if !sh.OK {
				t.Fatalf("refused: %+v", sh)
			}
			if _, err := st.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(st, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			tc.flag.Store(true)
			_, closed := e.srv.Recheck(context.Background())
			tc.flag.Store(false)
			if closed < 1 { // the earlier subtest's session may still be on its way out
				t.Fatalf("Recheck closed %d sessions; want the open one", closed)
			}
			_, err := io.Copy(io.Discard, st)
			wantCutCode(t, err, tc.abort) // the ABORT says which cut it was

			// "why", asked on a stream of the same connection (which still
			// serves), says what cut it.
			end := askWhy(t, m, sh.Session)
			if end.Code != tc.code || end.By != "server" {
				t.Fatalf("why: %+v; want %s by the server", end, tc.code)
			}
		})
	}
}

// askWhy asks the server, on a stream of m, why session sid ended.
func askWhy(t *testing.T, m *mux.Conn, sid string) wire.SessionEnd {
	t.Helper()
	var hb bytes.Buffer
	if err := wire.WriteClientHello(&hb, wire.ClientHello{V: wire.Version, Op: wire.OpWhy, Session: sid}); err != nil {
		t.Fatal(err)
	}
	st, err := m.Open(hb.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(20 * time.Second))
	sh, err := wire.ReadServerHello(st)
	if err != nil {
		t.Fatal(err)
	}
	if sh.End == nil {
		t.Fatalf("why %s: %+v; want how it ended", sid, sh)
	}
	return *sh.End
}

// Drain (Shutdown): the server sends GOAWAY, a stream the client opens after
// it is refused (nothing reached a destination: the client may open it on
// another connection), the open stream finishes with every byte, and the
// connection closes cleanly with it.
func TestTLSMuxDrain(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	m, _ := e.muxConn(t)
	st, sh := muxDial(t, m, e.echo)
	if !sh.OK {
		t.Fatalf("refused: %+v", sh)
	}
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		done <- e.srv.Shutdown(ctx)
	}()
	waitFor(t, func() bool { return !m.Usable(time.Now()) }) // until GOAWAY arrived
	if _, err := m.Open(nil); !errors.Is(err, mux.ErrFull) {
		t.Fatalf("a stream after GOAWAY: %v; want %v (nothing sent)", err, mux.ErrFull)
	}
	if err := echoChecksum(st, 256<<10); err != nil {
		t.Fatalf("the open stream during drain: %v", err)
	}
	select {
	case <-m.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the connection did not end with its last stream")
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown = %v; want a drain without force", err)
	}
}

// A forced shutdown (the drain's deadline passed with sessions live): every
// open stream is cut with the shutdown code in its ABORT, so the client knows
// why without asking a server that is going away; the connection then ends.
func TestTLSMuxForcedShutdownSaysShutdown(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	m, _ := e.muxConn(t)
	var streams []*mux.Stream
	for range 3 {
		st, sh := muxDial(t, m, e.echo)
		if !sh.OK {
			t.Fatalf("refused: %+v", sh)
		}
		streams = append(streams, st)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.srv.Shutdown(ctx) }()
	waitFor(t, func() bool { return !m.Usable(time.Now()) }) // draining: GOAWAY arrived
	cancel()                                                 // give up draining: force
	for i, st := range streams {
		_, err := io.Copy(io.Discard, st)
		if err == nil {
			t.Fatalf("stream %d ended cleanly at a forced shutdown; want a cut", i)
		}
		wantCutCode(t, err, wire.QUICShutdown)
	}
	select {
	case <-m.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the connection outlived the forced shutdown")
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Shutdown = %v; want the forced end (%v)", err, context.Canceled)
	}
}

// A stream opened after the server began to drain (the client had not yet
// read its GOAWAY) is refused with ABORT (refused): nothing reached a
// destination, so a client opens it on another connection.
func TestTLSMuxStreamDuringDrainRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	raw := e.rawMux(t)
	var hb bytes.Buffer
	_ = wire.WriteClientHello(&hb, dialHello(t, e.echo))
	if _, err := raw.Write(mux.AppendFrame(nil, mux.FrameOpen, 1, hb.Bytes())); err != nil {
		t.Fatal(err)
	}
	if typ, id, _ := readFrame(t, raw); typ != mux.FrameData || id != 1 { // the answer: ok
		t.Fatalf("frame 0x%02x for stream %d; want the server's hello on stream 1", typ, id)
	}
	go func() { // stream 1 stays open: the drain waits for it
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = e.srv.Shutdown(ctx)
	}()
	if typ, id, _ := readFrame(t, raw); typ != mux.FrameGoAway || id != 0 {
		t.Fatalf("frame 0x%02x for stream %d; want GOAWAY", typ, id)
	}
	if _, err := raw.Write(mux.AppendFrame(nil, mux.FrameOpen, 2, hb.Bytes())); err != nil {
		t.Fatal(err)
	}
	if typ, id, p := readFrame(t, raw); typ != mux.FrameAbort || id != 2 || !bytes.Equal(p, []byte{mux.AbortRefused}) {
		t.Fatalf("frame 0x%02x for stream %d (%x); want ABORT refused for stream 2", typ, id, p)
	}
	// Stream 1 still works, and its end ends the connection and the drain.
	if _, err := raw.Write(append(mux.AppendFrame(nil, mux.FrameData, 1, []byte("z")), mux.AppendFrame(nil, mux.FrameFin, 1, nil)...)); err != nil {
		t.Fatal(err)
	}
	if typ, id, p := readFrame(t, raw); typ != mux.FrameData || id != 1 || string(p) != "z" {
		t.Fatalf("frame 0x%02x for stream %d (%q); want the echo of z", typ, id, p)
	}
}

// rawMux is a TLS connection that negotiated tp-mux/1, for frames by hand.
func (e *env) rawMux(t testing.TB) *tls.Conn {
	t.Helper()
	cfg := e.clientTLS(&e.cert)
	cfg.NextProtos = []string{wire.ALPNMux}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c
}

// readFrame reads the next frame from c other than WINDOW and PONG.
func readFrame(t testing.TB, c net.Conn) (typ byte, id uint32, payload []byte) {
	t.Helper()
	for {
		var h [mux.HeaderLen]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			t.Fatalf("reading a frame: %v", err)
		}
		p := make([]byte, binary.BigEndian.Uint16(h[5:7]))
		if _, err := io.ReadFull(c, p); err != nil {
			t.Fatalf("reading a frame's payload: %v", err)
		}
		if h[0] != mux.FrameWindow && h[0] != mux.FramePong {
			return h[0], binary.BigEndian.Uint32(h[1:5]), p
		}
	}
}

// Bad input from a client ends its tp-mux connection with an error the log
// line states, at a bounded cost, and the server serves on: a frame of
// unknown type, a WINDOW of the wrong size, data for a stream never opened,
// streams opened out of order, more streams than wire.MuxMaxStreams, data
// beyond a stream's window, a GOAWAY from the client, and a client that goes
// silent in the middle of a frame.
func TestTLSMuxBadInput(t *testing.T) { // not parallel: it shortens the process's tp-mux timers
	frame := func(typ byte, id uint32, payload []byte) []byte { return mux.AppendFrame(nil, typ, id, payload) }
	logs := &testlog.Buffer{}
	// A dial of port 1 waits in the policy until the server has ended the
	// connection it came on (hold, the running subtest's): its stream reads
	// nothing beyond its hello, so its window cannot open. The connection's
	// log line comes once its sessions have ended.
	var hold atomic.Pointer[chan struct{}]
	e := newEnv(t, func(c *proxy.Config) {
		c.Logger = slog.New(slog.NewTextHandler(logs, nil))
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			if req.Destination.Port == 1 {
				select {
				case <-*hold.Load():
				case <-ctx.Done():
				}
				return authz.Decision{Reason: "port 1 is held"}, nil
			}
			return allowAll(ctx, req)
		})
	})
	newHold := func(t *testing.T) (release func()) {
		ch := make(chan struct{})
		hold.Store(&ch)
		var once sync.Once
		release = func() { once.Do(func() { close(ch) }) }
		t.Cleanup(release)
		return release
	}
	var hb bytes.Buffer
	_ = wire.WriteClientHello(&hb, dialHello(t, "127.0.0.1:1"))
	for _, tc := range []struct {
		what  string
		input func() []byte
		want  string // in the connection's log line
	}{
		{"an unknown frame type", func() []byte { return frame(0x7f, 0, nil) }, "frame type 0x7f on stream 0"},
		{"a WINDOW of 3 bytes", func() []byte {
			return append(frame(mux.FrameOpen, 1, nil), frame(mux.FrameWindow, 1, []byte{1, 2, 3})...)
		}, "a WINDOW of 3 bytes"},
		{"data for a stream never opened", func() []byte { return frame(mux.FrameData, 9, []byte("x")) }, "data for stream 9, which was never opened"},
		{"streams opened out of order", func() []byte { return append(frame(mux.FrameOpen, 5, nil), frame(mux.FrameOpen, 3, nil)...) }, "stream 3 opened after stream 5"},
		{"GOAWAY from the client", func() []byte { return frame(mux.FrameGoAway, 0, nil) }, "the client sent GOAWAY"},
		{"more streams than the limit", func() []byte {
			var b []byte
			for i := range wire.MuxMaxStreams + 1 {
				b = append(b, frame(mux.FrameOpen, uint32(i+1), nil)...)
			}
			return b
		}, "the client opened more than 1000 streams at once"},
		{"data beyond the window", func() []byte {
			b := frame(mux.FrameOpen, 1, hb.Bytes())
			chunk := make([]byte, wire.MuxMaxPayload)
			for range wire.MuxStreamWindow/wire.MuxMaxPayload + 2 {
				b = append(b, frame(mux.FrameData, 1, chunk)...)
			}
			return b
		}, "beyond its window"},
	} {
		t.Run(tc.what, func(t *testing.T) {
			release := newHold(t)
			raw := e.rawMux(t)
			go func() { _, _ = raw.Write(tc.input()) }()
			wantConnEnd(t, raw, logs, tc.want, release)
			e.mustEcho(t)
		})
	}
	t.Run("silent in a frame", func(t *testing.T) {
		defer proxy.SetTLSMuxTimers(50*time.Millisecond, 500*time.Millisecond, time.Minute)()
		release := newHold(t)
		raw := e.rawMux(t)
		if _, err := raw.Write([]byte{mux.FrameData, 0, 0}); err != nil { // half a header, then nothing
			t.Fatal(err)
		}
		wantConnEnd(t, raw, logs, "nothing arrived from the client for 500ms", release)
		e.mustEcho(t)
	})
}

// wantConnEnd waits for the server to end raw (its reads fail), calls ended,
// and waits for its log line about the connection to say want.
func wantConnEnd(t *testing.T, raw *tls.Conn, logs *testlog.Buffer, want string, ended func()) {
	t.Helper()
	_ = raw.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.Copy(io.Discard, raw); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the server did not end the connection")
	}
	ended()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(logs.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("no log line says %q:\n%s", want, logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A tunnel that is a tp-mux stream ends when the client certificate that
// authorised it expires, even with data flowing: a cut that says why
// (cert_expired), never a clean end.
func TestTLSMuxSessionEndsAtCertificateExpiry(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	cert := e.ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{NotAfter: time.Now().Add(2 * time.Second)})
	d := &clients.Dialer{Server: e.addr, TLSConfig: e.clientTLS(&cert), Transport: clients.TransportTLS}
	defer d.Close()
	c, err := d.DialContext(context.Background(), "tcp", e.echo)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if conns, streams := d.TLSMuxStats(); conns != 1 || streams != 1 {
		t.Fatalf("%d tp-mux connections, %d streams; want the tunnel to be a stream", conns, streams)
	}
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(c) // the echo keeps the session open
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the session outlived the client certificate")
	}
	var ce *clients.CutError
	if !errors.As(err, &ce) {
		t.Fatalf("at expiry the client read %v (%T); want a *clients.CutError", err, err)
	}
	clients.ExplainCut(context.Background(), err)
	if ce.End == nil || ce.End.Code != wire.EndCertExpired {
		t.Fatalf("explained as %q; want cert_expired", err)
	}
}
