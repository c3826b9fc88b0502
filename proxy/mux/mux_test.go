package mux_test

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// pair is a client and a server end over a loopback TCP connection; the
// server's accepted streams arrive on the channel.
func pair(t *testing.T, o mux.Options) (*mux.Conn, chan *mux.Stream) {
	t.Helper()
	a, b := testnet.Pair(t)
	accepted := make(chan *mux.Stream, 16)
	server := mux.New(a, o, func(s *mux.Stream) { accepted <- s })
	o.Client = true
	client := mux.New(b, o, nil)
	t.Cleanup(func() { client.Fail(errors.New("test over")); server.Fail(errors.New("test over")) })
	return client, accepted
}

// A stream is a net.Conn by the standard library's conformance tests:
// reads, writes, deadlines, concurrent use and Close.
func TestStreamIsConn(t *testing.T) {
	nettest.TestConn(t, func() (c1, c2 net.Conn, stop func(), err error) {
		client, accepted := pair(t, mux.Options{})
		s1, err := client.Open(nil)
		if err != nil {
			return nil, nil, nil, err
		}
		s2 := <-accepted
		return s1, s2, func() { _ = s1.Close(); _ = s2.Close() }, nil
	})
}

// The end of a stream is told apart: FIN reads as io.EOF (half-close: the
// other direction goes on), ABORT as a cut (wire.ErrTruncated), refused as a
// cut that says nothing was served, and the connection's death as a cut of
// every open stream.
func TestStreamEnds(t *testing.T) {
	client, accepted := pair(t, mux.Options{MaxPayload: 1 << 15, SendPayload: 1 << 15, StreamWindow: 64 << 10})
	half, _ := client.Open([]byte("a"))
	hs := <-accepted
	if err := half.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(hs); err != nil || string(b) != "a" {
		t.Fatalf("after FIN the server read %q, %v; want a and a clean end", b, err)
	}
	if _, err := hs.Write([]byte("back")); err != nil {
		t.Fatalf("the other direction after a half-close: %v", err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(half, buf); err != nil || string(buf) != "back" {
		t.Fatalf("read %q, %v", buf, err)
	}

	cut, _ := client.Open(nil)
	cs := <-accepted
	cs.Abort(0)
	if _, err := io.ReadAll(cut); !errors.Is(err, wire.ErrTruncated) || errors.Is(err, mux.ErrRefused) {
		t.Fatalf("an aborted stream read %v; want a cut", err)
	}

	refused, _ := client.Open(nil)
	(<-accepted).AbortWith(mux.AbortRefused)
	if _, err := io.ReadAll(refused); !errors.Is(err, mux.ErrRefused) || !errors.Is(err, wire.ErrTruncated) {
		t.Fatalf("a refused stream read %v; want a cut that says nothing was served", err)
	}

	open, _ := client.Open(nil)
	<-accepted
	wire.Abort(client.NetConn(), wire.QUICPeerReset)
	if _, err := io.ReadAll(open); !errors.Is(err, wire.ErrTruncated) {
		t.Fatalf("a stream of a dead connection read %v; want a cut", err)
	}
	if _, err := client.Open(nil); !errors.Is(err, mux.ErrFull) {
		t.Fatalf("opening on a dead connection: %v; want ErrFull", err)
	}
}

// Several Reads wait on one stream at once (net.Conn allows it), and each
// thing that ends a wait ends every one of them: a read deadline that passes,
// data (one reader takes it, the others go on waiting for more, then for the
// end), and the peer's FIN. Before, a wake-up reached one waiting Read only,
// and the others waited for ever (a hang seen in nettest's concurrency test).
func TestConcurrentReadsAllWake(t *testing.T) {
	const readers = 8
	client, accepted := pair(t, mux.Options{})
	st, err := client.Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	ss := <-accepted
	start := func() chan error {
		done := make(chan error, readers)
		for range readers {
			go func() {
				_, err := ss.Read(make([]byte, 64))
				done <- err
			}()
		}
		waitReading(t, ss, readers)
		return done
	}
	collect := func(what string, done chan error, n int, want func(error) bool) {
		t.Helper()
		for i := range n {
			select {
			case err := <-done:
				if !want(err) {
					t.Fatalf("%s: a Read returned %v", what, err)
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("%s: %d of %d waiting Reads returned within 20s", what, i, n)
			}
		}
	}

	done := start()
	_ = ss.SetReadDeadline(time.Now())
	collect("a read deadline that passed", done, readers, func(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) })
	_ = ss.SetReadDeadline(time.Time{})

	done = start()
	if _, err := st.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	collect("one byte sent", done, 1, func(err error) bool { return err == nil })
	waitReading(t, ss, readers-1) // the others wait again
	if err := st.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	collect("the peer's FIN", done, readers-1, func(err error) bool { return err == io.EOF })
}

// waitReading waits until n Reads of s are waiting.
func waitReading(t *testing.T, s *mux.Stream, n int) {
	t.Helper()
	waitCount(t, "Reads waiting", s.ReadsWaiting, n)
}

// Bulk through one stream with windows smaller than the data and frames of
// the largest size: every byte arrives in order, and the window grows within
// its bounds.
func TestStreamBulk(t *testing.T) {
	client, accepted := pair(t, mux.Options{MaxPayload: mux.MaxFramePayload, StreamWindow: 128 << 10, MaxStreamWindow: 4 << 20, GrowWithin: time.Hour})
	s, _ := client.Open(nil)
	const size = 32 << 20
	go func() {
		chunk := []byte(strings.Repeat("0123456789abcdef", 8192)) // 128 KiB
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := s.Write(chunk); err != nil {
				return
			}
		}
		_ = s.CloseWrite()
	}()
	r := <-accepted
	buf := make([]byte, 100_000) // not a multiple of anything
	var n int
	for {
		m, err := r.Read(buf)
		for i := range m {
			if buf[i] != "0123456789abcdef"[(n+i)%16] {
				t.Fatalf("byte %d is %q", n+i, buf[i])
			}
		}
		n += m
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if n != size {
		t.Fatalf("read %d bytes; want %d", n, size)
	}
	if w := r.Window(); w <= 128<<10 || w > 4<<20 {
		t.Fatalf("the window is %d after 32 MiB read at once; want it grown, at most 4 MiB", w)
	}
}

// ABORT's code (Options.AbortCodes, tp-mux/1): the cut reads as a stream
// reset with that code; without AbortCodes the ABORT is one byte, as the
// end-to-end carriers' older peers require, and reads as a cut without a code.
// The bad input: an ABORT of three bytes, which ends the connection.
func TestAbortCode(t *testing.T) {
	for _, codes := range []bool{true, false} {
		client, accepted := pair(t, mux.Options{AbortCodes: codes})
		st, err := client.Open([]byte("x"))
		if err != nil {
			t.Fatal(err)
		}
		ss := <-accepted
		ss.Abort(wire.QUICRevoked)
		_ = st.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = io.ReadAll(st)
		code, ok := wire.StreamResetCode(err)
		if !errors.Is(err, wire.ErrTruncated) || ok != codes || (codes && code != wire.QUICRevoked) {
			t.Fatalf("AbortCodes %v: the client read %v (code %v, %v); want a cut, with the code revoked only when codes are on", codes, err, code, ok)
		}
	}
	a, b := testnet.Pair(t)
	server := mux.New(a, mux.Options{AbortCodes: true}, func(*mux.Stream) {})
	t.Cleanup(func() { server.Fail(errors.New("test over")) })
	_, _ = b.Write(mux.AppendFrame(nil, mux.FrameOpen, 1, nil))
	_, _ = b.Write(mux.AppendFrame(nil, mux.FrameAbort, 1, []byte{mux.AbortCut, 3, 0}))
	select {
	case <-server.Done():
		if err := server.Err(); err == nil || !strings.Contains(err.Error(), "an ABORT of 3 bytes") {
			t.Fatalf("the connection ended with %v; want a protocol error about the ABORT of 3 bytes", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("an ABORT of 3 bytes did not end the connection")
	}
}

// Close, with the peer's direction still open and nothing of it unread, ends
// the stream as closing a TCP socket does: the peer reads a clean end, and a
// peer that then ends its own direction ends the stream cleanly (never cut).
// The bad input: a peer that writes after the close is cut, as a reset would.
func TestCloseLikeTCP(t *testing.T) {
	client, accepted := pair(t, mux.Options{AbortCodes: true})
	st, err := client.Open([]byte("q"))
	if err != nil {
		t.Fatal(err)
	}
	ss := <-accepted
	_ = ss.SetDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(io.LimitReader(ss, 1)); err != nil || string(b) != "q" {
		t.Fatalf("server read %q, %v", b, err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(ss); err != nil || len(b) != 0 {
		t.Fatalf("after the client's Close the server read %q, %v; want a clean end", b, err)
	}
	if err := ss.CloseWrite(); err != nil {
		t.Fatalf("the server's FIN after the client's Close: %v", err)
	}
	waitStreams(t, client, 0) // both directions ended: the stream is gone, cleanly

	st2, err := client.Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	ss2 := <-accepted
	_ = ss2.SetDeadline(time.Now().Add(10 * time.Second))
	if err := st2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(ss2); err != nil {
		t.Fatalf("the second stream's clean end: %v", err)
	}
	if _, err := ss2.Write([]byte("nobody reads this")); err != nil {
		t.Fatalf("the first write after the peer's Close still goes out: %v", err)
	}
	var werr error
	for deadline := time.Now().Add(10 * time.Second); werr == nil && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		_, werr = ss2.Write([]byte("x"))
	}
	if !errors.Is(werr, wire.ErrTruncated) {
		t.Fatalf("writing to a stream the peer closed: %v; want a cut (%v)", werr, wire.ErrTruncated)
	}
	waitStreams(t, client, 0)
}

// waitStreams waits until m holds n streams.
func waitStreams(t *testing.T, m *mux.Conn, n int) {
	t.Helper()
	waitCount(t, "streams open", m.Streams, n)
}

// waitCount polls count, for up to 20 s, until it is n.
func waitCount(t *testing.T, what string, count func() int, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for count() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d %s; want %d", count(), what, n)
		}
		time.Sleep(5 * time.Millisecond) // polling, bounded by the deadline
	}
}

// Bad input: a peer sends a stream's whole window as one-byte DATA frames to
// a reader that does not read. Before, each frame took a buffer of its own
// (2 KiB for a byte): 250,000 such frames on an end-to-end carrier took an
// agent from 16 MB to 617 MB. The stream now holds at most twice its window
// and one buffer, whatever the frame sizes; frames of alternating sizes
// chosen to leave each buffer nearly empty are held within the same bound.
func TestTinyFramesHoldBoundedMemory(t *testing.T) {
	const window = 128 << 10
	o := mux.Options{StreamWindow: window, MaxStreamWindow: window, MaxPayload: wire.MuxMaxPayload, SendPayload: wire.MuxMaxPayload}
	for _, tc := range []struct {
		name  string
		sizes []int // frame sizes, repeated until the window is full
	}{
		{"one byte each", []int{1}},
		{"one byte, then a small buffer's worth", []int{1, 2048}},
		{"just over a small buffer, then most of a large one", []int{2049, wire.MuxMaxPayload - 2048}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := testnet.Pair(t)
			accepted := make(chan *mux.Stream, 1)
			server := mux.New(a, o, func(s *mux.Stream) { accepted <- s })
			t.Cleanup(func() { server.Fail(errors.New("test over")) })
			var frames []byte
			frames = mux.AppendFrame(frames, mux.FrameOpen, 1, nil)
			sent := 0
			for i := 0; ; i++ {
				n := min(tc.sizes[i%len(tc.sizes)], window-sent)
				if n == 0 {
					break
				}
				frames = mux.AppendFrame(frames, mux.FrameData, 1, make([]byte, n))
				sent += n
			}
			if _, err := b.Write(frames); err != nil {
				t.Fatal(err)
			}
			s := <-accepted
			waitHeld := time.Now().Add(20 * time.Second)
			for s.Buffered() < sent { // the frames are taken in as they arrive
				if time.Now().After(waitHeld) {
					t.Fatalf("the stream took in %d of the %d bytes sent within 20s", s.Buffered(), sent)
				}
				time.Sleep(5 * time.Millisecond) // polling, bounded by the deadline
			}
			if bound := 2*window + wire.MuxMaxPayload; s.Held() > bound {
				t.Fatalf("after %d payload bytes in frames of %v bytes the stream holds %d bytes of buffers; the bound is %d", sent, tc.sizes, s.Held(), bound)
			}
			got, err := io.ReadAll(io.LimitReader(s, int64(sent)))
			if err != nil || len(got) != sent {
				t.Fatalf("reading the held payloads: %d bytes, %v; want all %d", len(got), err, sent)
			}
		})
	}
}

// A closed stream whose peer neither ends its direction nor sends more (bad
// input: a peer that keeps a stream half open for ever) is cut after Linger:
// the stream is gone at both ends, and the peer's writes fail as a cut.
func TestCloseLingerCuts(t *testing.T) {
	client, accepted := pair(t, mux.Options{AbortCodes: true, Linger: 100 * time.Millisecond})
	st, err := client.Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	ss := <-accepted
	if err := ss.Close(); err != nil { // the server's end; the client's stays open
		t.Fatal(err)
	}
	_ = st.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(st); err != nil || len(b) != 0 {
		t.Fatalf("after the server's Close the client read %q, %v; want its FIN", b, err)
	}
	waitStreams(t, client, 0)
	if _, err := st.Write([]byte("x")); !errors.Is(err, wire.ErrTruncated) {
		t.Fatalf("writing to a stream cut after the linger: %v; want a cut (%v)", err, wire.ErrTruncated)
	}
}

// A peer that closes the connection with no stream open gets a clean end
// back: the other end closes too (its reads end at EOF), and records the
// peer's close. Before, the end that read the close failed the connection as
// broken and reset it, so that a dialer closing its end-to-end carrier after
// every stream ended saw (and logged) a reset. A close while a stream is
// still open remains a break: that stream is cut, and the connection reset.
func TestPeerCloseAnsweredInKind(t *testing.T) {
	for _, tc := range []struct {
		name      string
		open      bool // a stream is open when the peer closes
		wantReset bool
	}{
		{"no stream open", false, false},
		{"a stream open", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := testnet.Pair(t)
			accepted := make(chan *mux.Stream, 1)
			server := mux.New(a, mux.Options{}, func(s *mux.Stream) { accepted <- s })
			t.Cleanup(func() { server.Fail(errors.New("test over")) })
			if tc.open {
				if _, err := b.Write(mux.AppendFrame(nil, mux.FrameOpen, 1, []byte("x"))); err != nil {
					t.Fatal(err)
				}
				<-accepted
			}
			if err := b.CloseWrite(); err != nil { // the peer's clean close
				t.Fatal(err)
			}
			_ = b.SetReadDeadline(time.Now().Add(20 * time.Second))
			_, err := io.ReadAll(b)
			if reset := errors.Is(err, syscall.ECONNRESET); reset != tc.wantReset || err != nil && !reset {
				t.Fatalf("the peer, after closing, read %v; want a reset: %v", err, tc.wantReset)
			}
			select {
			case <-server.Done():
			case <-time.After(20 * time.Second):
				t.Fatal("the connection did not end after the peer's close")
			}
			if err := server.Err(); err == nil || !strings.Contains(err.Error(), "the client closed the connection") {
				t.Fatalf("the connection ended with %v; want the client's close", err)
			}
		})
	}
}

// heldRead holds its second Read (the first frame's payload, after its
// header), with the bytes already read, until release is closed.
type heldRead struct {
	net.Conn
	reads   int
	held    chan struct{}
	release chan struct{}
}

func (c *heldRead) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.reads++; c.reads == 2 {
		close(c.held)
		<-c.release
	}
	return n, err
}

// A stream whose OPEN was read as the connection ended (the bad input: an
// OPEN frame read in full just before the owner fails the connection) is
// never accepted: a stream accepted then would belong to no connection, so
// nothing would end it, and an owner that counts its streams after Done
// would miss it.
func TestNoAcceptAfterDone(t *testing.T) {
	a, b := net.Pipe()
	t.Cleanup(func() { _ = b.Close() })
	g := &heldRead{Conn: a, held: make(chan struct{}), release: make(chan struct{})}
	accepted := make(chan *mux.Stream, 1)
	m := mux.New(g, mux.Options{}, func(s *mux.Stream) { accepted <- s })
	go func() { _, _ = b.Write(mux.AppendFrame(nil, mux.FrameOpen, 1, []byte("late"))) }()
	select {
	case <-g.held:
	case <-time.After(20 * time.Second):
		t.Fatal("the connection did not read the OPEN frame's payload")
	}
	m.Fail(errors.New("ended by its owner"))
	close(g.release)
	select {
	case <-m.ReaderDone():
	case <-time.After(20 * time.Second):
		t.Fatal("the connection's reader did not return after its end")
	}
	select {
	case s := <-accepted:
		_ = s.SetReadDeadline(time.Now().Add(time.Second))
		_, err := io.ReadAll(s)
		t.Fatalf("a stream was accepted after the connection ended (its Read ended with %v)", err)
	default:
	}
}

// A connection this end closes lets the peer finish reading: the peer's last
// frames (here a PING sent just after the close; in tpd, a client's WINDOW
// after its last read) are read and dropped, not answered with a reset, and
// what this end had sent but the peer had not yet taken arrives whole, then a
// clean end. Before, Close closed the socket at once: a frame arriving after
// that reset the connection, the kernel dropped the data still queued for the
// peer, and a client of a drained tpd saw its last stream cut
// (TestTLSMuxDrain, about 1 run in a few hundred). The peer here reads
// nothing until after the close, and its receive buffer holds less than the
// stream's data: some of it is still queued on this end when the PING comes.
func TestCloseLetsPeerFinish(t *testing.T) {
	a, b := testnet.Pair(t)
	if err := b.SetReadBuffer(64 << 10); err != nil {
		t.Fatal(err)
	}
	if err := a.SetWriteBuffer(1 << 20); err != nil {
		t.Fatal(err)
	}
	const size = 200 << 10 // more than the peer's buffer, within the stream's window (written without a WINDOW)
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	served := make(chan error, 1)
	server := mux.New(a, mux.Options{}, func(s *mux.Stream) {
		go func() {
			if _, err := io.ReadAll(s); err != nil {
				served <- err
				return
			}
			if _, err := s.Write(payload); err != nil {
				served <- err
				return
			}
			served <- s.CloseWrite()
		}()
	})
	t.Cleanup(func() { server.Fail(errors.New("test over")) })
	open := mux.AppendFrame(nil, mux.FrameOpen, 1, []byte("x"))
	open = mux.AppendFrame(open, mux.FrameFin, 1, nil)
	if _, err := b.Write(open); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatalf("the server's stream: %v", err)
	}
	waitStreams(t, server, 0)
	if err := server.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := b.Write(mux.AppendFrame(nil, mux.FramePing, 0, make([]byte, 8))); err != nil {
		t.Fatalf("the peer's PING after the close: %v", err)
	}
	_ = b.SetReadDeadline(time.Now().Add(20 * time.Second))
	var got []byte
	fin := false
	for !fin {
		var hdr [mux.HeaderLen]byte
		if _, err := io.ReadFull(b, hdr[:]); err != nil {
			t.Fatalf("the peer read %d of %d bytes, then %v; want them all, the FIN and a clean end", len(got), size, err)
		}
		p := make([]byte, int(hdr[5])<<8|int(hdr[6]))
		if _, err := io.ReadFull(b, p); err != nil {
			t.Fatalf("the peer read %d of %d bytes, then %v in a frame", len(got), size, err)
		}
		switch hdr[0] {
		case mux.FrameData:
			got = append(got, p...)
		case mux.FrameFin:
			fin = true
		}
	}
	if string(got) != string(payload) {
		t.Fatalf("the peer read %d bytes, not what the server wrote (%d bytes)", len(got), size)
	}
	if n, err := b.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the last stream's FIN the peer read %d bytes, %v; want the clean end (EOF)", n, err)
	}
	_ = b.Close()
	select {
	case <-server.ReaderDone():
	case <-time.After(20 * time.Second):
		t.Fatal("the closed connection's reader did not end after the peer's end")
	}
	select {
	case <-server.Closed():
	case <-time.After(20 * time.Second):
		t.Fatal("the closed connection's transport was not closed after the peer's end")
	}
}

// A peer that never closes its end (the bad input: a client that went
// silent) does not hold a closed connection's socket: it is closed once the
// linger passes, and Closed says so.
func TestCloseLingerEnds(t *testing.T) {
	a, b := testnet.Pair(t)
	server := mux.New(a, mux.Options{}, func(*mux.Stream) {})
	t.Cleanup(func() { server.Fail(errors.New("test over")) })
	if err := server.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-server.Closed():
	case <-time.After(30 * time.Second):
		t.Fatal("a closed connection whose peer never closed kept its socket for 30s")
	}
	_ = b.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.ReadAll(b); err != nil {
		t.Fatalf("the silent peer, reading after the linger: %v; want the clean end it was sent", err)
	}
}
