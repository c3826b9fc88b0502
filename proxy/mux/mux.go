package mux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Frame types. A frame is type (1 byte), stream id (4 bytes, big-endian),
// payload length (2 bytes, big-endian), payload.
const (
	FrameOpen   = 0x01 // client: a new stream, id above every earlier one; payload: its first bytes
	FrameData   = 0x02 // payload: bytes of the stream
	FrameFin    = 0x03 // the end of the sender's direction (clean)
	FrameAbort  = 0x04 // the stream is cut both ways; payload: the reason (1 byte), then the cut's code (1 byte, Options.AbortCodes)
	FrameWindow = 0x05 // payload: 4 bytes, more bytes the sender of this frame will accept
	FramePing   = 0x06 // stream 0; payload: 8 bytes the peer echoes in a pong
	FramePong   = 0x07 // stream 0; the ping's payload
	FrameGoAway = 0x08 // stream 0, server: no further streams on this connection

	AbortCut     = 0x00 // the sender's side failed (its destination reset, it gave up)
	AbortRefused = 0x01 // server: the stream was not served (nothing reached the destination)

	// HeaderLen is the length of a frame's header.
	HeaderLen = 7
	// MaxFramePayload is the most a payload length can say.
	MaxFramePayload = 1<<16 - 1
)

// ErrFull is a connection that takes no further stream (full, closing, or
// told to go away): the client uses another one. Nothing of the stream was sent.
var ErrFull = errors.New("the multiplexed connection takes no further stream")

// ErrRefused is in the error of a stream the server refused (ABORT with
// AbortRefused): nothing of it was served, so a client may open it again
// elsewhere.
var ErrRefused = errors.New("nothing of it was served")

// Options are one use's bounds and words. Zero values take the defaults
// (those of the end-to-end carriers, PROTOCOL section 11.4.1).
type Options struct {
	// Client is the end that opens streams.
	Client bool
	// Label names the connection in errors ("end-to-end carrier"), Noun in
	// short ("carrier"), StreamLabel a stream ("end-to-end stream"); Peer is
	// who is at the other end ("agent", "dialer", "server", "client"); Name is
	// the destination, for errors.
	Label, Noun, StreamLabel, Peer, Name string
	// Expires, when not zero, ends the connection (a cut of its streams, with
	// ExpiredReason) when it passes.
	Expires       time.Time
	ExpiredReason string
	// Now, when set, is the clock Expires is judged by: that of the TLS
	// session whose certificates set it (tls.Config.Time). Nil: time.Now.
	Now func() time.Time
	// MaxStreams bounds the open streams (both ends): a client with this many
	// open gets ErrFull; a server ends a connection whose client goes beyond.
	MaxStreams int
	// MaxPayload is the largest payload this end accepts, SendPayload the
	// largest it sends (at most MaxFramePayload; the peer must accept it).
	MaxPayload, SendPayload int
	// StreamWindow is how many unread bytes each end accepts per stream and
	// direction before the reader grants more. A reader that takes a quarter of
	// its window within GrowWithin of the last grant doubles it (as quic-go's
	// auto-tuning does), up to MaxStreamWindow, while the connection's
	// GrowBudget (summed over its streams) lasts.
	StreamWindow, MaxStreamWindow, GrowBudget int
	GrowWithin                                time.Duration
	// Tick is how often timers are checked (a client pings at each tick); Dead
	// cuts a connection from which nothing arrived for that long (and a write
	// that cannot go out for that long); Idle closes a client's connection
	// without streams for that long, ServerIdle a server's; Life is how long a
	// client opens streams on a connection (it closes it once its streams
	// ended).
	Tick, Dead, Idle, ServerIdle, Life time.Duration
	// Linger bounds how long a closed stream waits for the peer to end its
	// direction (FIN) before it is cut, as a closed TCP socket waits in
	// FIN_WAIT_2 (Stream.Close); zero is 10 s.
	Linger time.Duration
	// WriteFrames, when set, writes whole frames (b) to conn (e.g. one inner
	// TLS record per frame); the default is one conn.Write.
	WriteFrames func(conn net.Conn, b []byte) error
	// PeerAbort, when set, turns the error a stream cut by the peer's ABORT
	// reads into another (e.g. one that says who cut it).
	PeerAbort func(reason byte, err error) error
	// AbortCodes puts the cut's code (PROTOCOL section 6.1: shutdown,
	// cert_expired, revoked, policy_changed, peer_reset …) after the reason
	// of every ABORT that cuts a stream (tp-mux/1). Off, ABORT is one byte, as
	// the end-to-end carriers' older peers require. Either way an ABORT of one
	// or two bytes is accepted.
	AbortCodes bool
}

func (o Options) withDefaults() Options {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	dur := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&o.MaxStreams, 256)
	def(&o.MaxPayload, 16384-HeaderLen)
	def(&o.SendPayload, o.MaxPayload)
	o.MaxPayload, o.SendPayload = min(o.MaxPayload, MaxFramePayload), min(o.SendPayload, MaxFramePayload)
	def(&o.StreamWindow, 256<<10)
	def(&o.MaxStreamWindow, 4<<20)
	def(&o.GrowBudget, 16<<20)
	dur(&o.GrowWithin, 5*time.Millisecond)
	dur(&o.Tick, 15*time.Second)
	dur(&o.Dead, 60*time.Second)
	dur(&o.Idle, 60*time.Second)
	dur(&o.ServerIdle, 2*time.Minute)
	dur(&o.Life, time.Hour)
	dur(&o.Linger, 10*time.Second)
	if o.Label == "" {
		o.Label = "multiplexed connection"
	}
	if o.Noun == "" {
		o.Noun = "connection"
	}
	if o.StreamLabel == "" {
		o.StreamLabel = "stream"
	}
	if o.Peer == "" {
		o.Peer = "client"
		if o.Client {
			o.Peer = "server"
		}
	}
	if o.ExpiredReason == "" {
		o.ExpiredReason = "a certificate of the connection expired"
	}
	return o
}

// Receive buffers: a payload is read into one and kept until the stream's
// reader took it, so an idle stream holds none. Small payloads (interactive
// traffic) take small buffers.
const smallBuf = 2048

var (
	smallBufs = sync.Pool{New: func() any { b := make([]byte, smallBuf); return &b }}
	bigBufs   sync.Map // capacity → *sync.Pool
)

func bigPool(size int) *sync.Pool {
	if p, ok := bigBufs.Load(size); ok {
		return p.(*sync.Pool)
	}
	p, _ := bigBufs.LoadOrStore(size, &sync.Pool{New: func() any { b := make([]byte, size); return &b }})
	return p.(*sync.Pool)
}

// Conn is one end of a multiplexed connection over conn.
type Conn struct {
	conn net.Conn
	o    Options
	born time.Time
	big  *sync.Pool // buffers of o.MaxPayload bytes
	// accept, on the server's end, serves a stream the client opened: it is
	// called on the reader's goroutine and must start one of its own.
	accept func(*Stream)

	wmu  sync.Mutex // one frame sequence at a time on conn
	wbuf []byte
	werr error

	mu        sync.Mutex
	streams   map[uint32]*Stream
	lastID    uint32
	opened    int64 // streams opened over the connection's life
	closed    bool
	goaway    bool      // no further stream: GOAWAY sent (server) or received (client); the connection ends with its last stream
	err       error     // why the connection ended
	idleSince time.Time // when the last stream ended (zero while streams are open)

	lastRead atomic.Int64 // unix nanoseconds of the last frame read
	grown    atomic.Int64 // window growth of the streams, against GrowBudget

	cmu     sync.Mutex // control frames waiting for the writer goroutine
	credits map[uint32]uint32
	pong    []byte
	ping    bool
	cwake   chan struct{}

	// amu is read-held while accept runs and write-held to close done: once
	// Done is closed, accept is never called again (an owner that waits for
	// its streams after Done counts them all).
	amu   sync.RWMutex
	done  chan struct{}
	rdone chan struct{} // the reader goroutine returned
	// tclosed is closed when the transport is (Closed).
	tclosed chan struct{}
	tclose  sync.Once
}

// New runs the multiplexer over conn, which it owns from now on. accept (the
// server's end; nil for a client) is called on the reader's goroutine for
// each stream the client opens, with its first bytes already readable; it
// must not block (start a goroutine), nor end the connection itself. accept
// is never called once Done is closed.
func New(conn net.Conn, o Options, accept func(*Stream)) *Conn {
	now := time.Now()
	o = o.withDefaults()
	m := &Conn{conn: conn, o: o, born: now, accept: accept, big: bigPool(o.MaxPayload),
		streams: map[uint32]*Stream{}, idleSince: now, credits: map[uint32]uint32{},
		cwake: make(chan struct{}, 1), done: make(chan struct{}), rdone: make(chan struct{}), tclosed: make(chan struct{})}
	m.lastRead.Store(now.UnixNano())
	go m.readLoop()
	go m.controlLoop()
	return m
}

// NetConn is the connection the multiplexer runs over.
func (m *Conn) NetConn() net.Conn { return m.conn }

// Done is closed when the connection ended.
func (m *Conn) Done() <-chan struct{} { return m.done }

// Ended reports whether the connection ended.
func (m *Conn) Ended() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// Err is why the connection ended (nil while it runs).
func (m *Conn) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// Streams is the number of open streams.
func (m *Conn) Streams() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.streams)
}

// Opened is the number of streams opened over the connection's life.
func (m *Conn) Opened() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.opened
}

// SinceRead is how long ago the last frame arrived.
func (m *Conn) SinceRead() time.Duration { return time.Since(time.Unix(0, m.lastRead.Load())) }

// Grown is the window growth its streams took from the budget (tests).
func (m *Conn) Grown() int64 { return m.grown.Load() }

// Usable says whether a client may open a stream on m now.
func (m *Conn) Usable(now time.Time) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.closed && !m.goaway && len(m.streams) < m.o.MaxStreams &&
		!m.expired(now) && now.Sub(m.born) < m.o.Life
}

// expired says whether Expires passed, now by time.Now (Options.Now when set).
func (m *Conn) expired(now time.Time) bool {
	if m.o.Expires.IsZero() {
		return false
	}
	if m.o.Now != nil {
		now = m.o.Now()
	}
	return !now.Before(m.o.Expires)
}

// Open opens a stream carrying first (the client's end only). ErrFull means
// nothing was sent.
func (m *Conn) Open(first []byte) (*Stream, error) {
	s, err := m.openFrame(first[:min(len(first), m.o.SendPayload)])
	if err != nil {
		return nil, err
	}
	if rest := first[min(len(first), m.o.SendPayload):]; len(rest) > 0 {
		if _, err := s.Write(rest); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// openFrame takes the next stream id and writes the stream's OPEN frame with
// head, under one hold of wmu so that ids go out in order.
func (m *Conn) openFrame(head []byte) (*Stream, error) {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	m.mu.Lock()
	if m.closed || m.goaway || len(m.streams) >= m.o.MaxStreams {
		m.mu.Unlock()
		return nil, ErrFull
	}
	m.lastID++
	m.opened++
	s := newStream(m, m.lastID)
	m.streams[s.id] = s
	m.idleSince = time.Time{}
	m.mu.Unlock()
	s.swin -= len(head)
	m.wbuf = AppendFrame(m.wbuf[:0], FrameOpen, s.id, head)
	if err := m.writeLocked(m.wbuf); err != nil {
		return nil, err
	}
	m.trimWbufLocked()
	return s, nil
}

// AppendFrame appends a frame to dst.
func AppendFrame(dst []byte, typ byte, id uint32, payload []byte) []byte {
	dst = append(dst, typ)
	dst = binary.BigEndian.AppendUint32(dst, id)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(payload)))
	return append(dst, payload...)
}

// trimWbufLocked lets go of a write buffer larger than one Write's batch
// (writeData's), which only a burst of control frames makes.
func (m *Conn) trimWbufLocked() {
	if cap(m.wbuf) > 8*(m.o.SendPayload+HeaderLen) {
		m.wbuf = nil
	}
}

// writeLocked writes frames to the connection, with wmu held. A write that
// cannot go out within Dead means the peer stopped reading the connection
// (its reader never waits for anything else): the connection is cut.
func (m *Conn) writeLocked(b []byte) error {
	if m.werr != nil {
		return m.werr
	}
	_ = m.conn.SetWriteDeadline(time.Now().Add(m.o.Dead))
	var err error
	if m.o.WriteFrames != nil {
		err = m.o.WriteFrames(m.conn, b)
	} else {
		_, err = m.conn.Write(b)
	}
	if err != nil {
		m.werr = m.Fail(fmt.Errorf("writing to the %s: %w", m.o.Label, err))
		return m.werr
	}
	return nil
}

// frame writes one frame without payload or with a small one.
func (m *Conn) frame(typ byte, id uint32, payload []byte) error {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	m.wbuf = AppendFrame(m.wbuf[:0], typ, id, payload)
	return m.writeLocked(m.wbuf)
}

// GoAway tells the client that the connection takes no further stream
// (without closing it).
func (m *Conn) GoAway() error { return m.frame(FrameGoAway, 0, nil) }

// writeData writes p as DATA frames of stream id, in one write.
func (m *Conn) writeData(id uint32, p []byte) error {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	m.wbuf = m.wbuf[:0]
	for len(p) > 0 {
		n := min(len(p), m.o.SendPayload)
		m.wbuf = AppendFrame(m.wbuf, FrameData, id, p[:n])
		p = p[n:]
	}
	err := m.writeLocked(m.wbuf)
	m.trimWbufLocked()
	return err
}

// protocolError is a breach of the protocol by the peer: it ends the connection.
func (m *Conn) protocolError(format string, args ...any) error {
	return &wire.ProtocolError{Err: fmt.Errorf(m.o.Label+": "+format, args...)}
}

// Fail ends the connection: every open stream fails with a cut carrying
// cause. It returns the error the connection ended with (the first cause).
func (m *Conn) Fail(cause error) error {
	m.mu.Lock()
	if m.closed && m.err != nil {
		err := m.err
		m.mu.Unlock()
		return err
	}
	m.closed = true
	m.err = cause
	streams := m.streams
	m.streams = map[uint32]*Stream{}
	m.mu.Unlock()
	what := m.o.Label
	if m.o.Name != "" {
		what += " to " + m.o.Name
	}
	cut := fmt.Errorf("the %s ended (%v): %w", what, cause, wire.ErrTruncated)
	for _, s := range streams {
		s.cut(cut)
	}
	var pe *wire.ProtocolError
	if errors.As(cause, &pe) {
		wire.Abort(m.conn, wire.QUICInternal)
	} else {
		wire.Abort(m.conn, wire.QUICPeerReset)
	}
	m.tclose.Do(func() { close(m.tclosed) })
	m.ended()
	return cause
}

// Close ends a connection without open streams cleanly (close_notify);
// streams still open are cut. A stream closed here that waits for its peer's
// FIN (Stream.Close) is not open: this end already sent all it will.
func (m *Conn) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	open := 0
	for _, s := range m.streams {
		s.mu.Lock()
		if !s.closed {
			open++
		}
		s.mu.Unlock()
	}
	if open > 0 {
		m.mu.Unlock()
		m.Fail(errors.New("closed with streams open"))
		return nil
	}
	m.closed = true
	m.err = errors.New("closed")
	m.mu.Unlock()
	m.wmu.Lock()
	_ = m.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	err := m.closeTransport()
	m.werr = net.ErrClosed
	m.wmu.Unlock()
	m.ended()
	return err
}

// closeLinger bounds how long a connection closed by this end (Close) waits
// for the peer's end before its transport is closed.
const closeLinger = 3 * time.Second

// closeTransport ends this end of the transport cleanly and lets the peer's
// end arrive: close_notify and the transport's half-close (a TCP FIN) go out
// now, the reader reads on (dropping what comes) until the peer's end or
// closeLinger, and only then is the transport closed. A socket closed at once
// while the peer's last frames (a WINDOW, a PING) were on their way, or still
// unread, is reset, and a reset drops what this end had sent but the peer had
// not yet received: the peer saw its last stream's data cut off. A transport
// that cannot half-close is closed at once.
func (m *Conn) closeTransport() error {
	cw, ok := m.conn.(interface{ CloseWrite() error })
	if !ok {
		m.closeConn()
		return nil
	}
	err := cw.CloseWrite()              // close_notify
	_ = wire.HalfCloseTransport(m.conn) // and the FIN of the TCP connection below
	go func() {
		t := time.NewTimer(closeLinger)
		defer t.Stop()
		select {
		case <-m.rdone:
		case <-t.C:
		}
		m.closeConn()
	}()
	return err
}

// closeConn closes the transport, and then Closed.
func (m *Conn) closeConn() {
	_ = m.conn.Close()
	m.tclose.Do(func() { close(m.tclosed) })
}

// Closed is closed when the transport is: at once when the connection
// fails, once the peer's end arrived (or closeLinger passed) after Close.
// An owner about to exit waits for it, or the process's exit would close the
// socket while the peer's last frames arrive, and reset it.
func (m *Conn) Closed() <-chan struct{} { return m.tclosed }

// readLoop reads frames until the connection ends. It never writes (control
// frames go to controlLoop), so a connection whose both ends write much
// cannot deadlock on full buffers.
func (m *Conn) readLoop() {
	defer close(m.rdone)
	var hdr [HeaderLen]byte
	var small [8]byte
	for {
		if _, err := io.ReadFull(m.conn, hdr[:]); err != nil {
			m.readFailed(err)
			return
		}
		m.lastRead.Store(time.Now().UnixNano())
		typ, id, n := hdr[0], binary.BigEndian.Uint32(hdr[1:5]), int(binary.BigEndian.Uint16(hdr[5:7]))
		if n > m.o.MaxPayload {
			m.Fail(m.protocolError("a frame of %d bytes; at most %d", n, m.o.MaxPayload))
			return
		}
		var err error
		switch typ {
		case FrameOpen, FrameData:
			buf := m.getBuf(n)
			if _, err = io.ReadFull(m.conn, (*buf)[:n]); err == nil {
				err = m.onData(typ, id, buf, n)
			} else {
				putBuf(buf)
			}
		default:
			if n > len(small) {
				m.Fail(m.protocolError("a frame of type 0x%02x with %d bytes", typ, n))
				return
			}
			if _, err = io.ReadFull(m.conn, small[:n]); err == nil {
				err = m.onControl(typ, id, small[:n])
			}
		}
		if err != nil {
			m.readFailed(err)
			return
		}
	}
}

func (m *Conn) getBuf(n int) *[]byte {
	if n <= smallBuf {
		return smallBufs.Get().(*[]byte)
	}
	return m.big.Get().(*[]byte)
}

func putBuf(b *[]byte) {
	if cap(*b) == smallBuf {
		smallBufs.Put(b)
		return
	}
	bigPool(cap(*b)).Put(b)
}

func (m *Conn) readFailed(err error) {
	var pe *wire.ProtocolError
	switch {
	case errors.As(err, &pe):
	case errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF):
		err = fmt.Errorf("the %s closed the %s", m.o.Peer, m.o.Noun)
		if m.closeIdle(err) {
			return // a clean end answered with one: no stream was cut
		}
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, wire.ErrTruncated):
		err = fmt.Errorf("the %s was cut in the middle of a frame: %w", m.o.Noun, err)
	default:
		err = fmt.Errorf("reading the %s: %w", m.o.Label, err)
	}
	m.Fail(err)
}

// closeIdle ends the connection cleanly (close_notify, then the transport's
// own close), recording cause, when the peer closed it with no stream left: a
// clean end is answered with one, not a reset. It reports false, doing
// nothing, when streams are still there (they are cut: Fail).
func (m *Conn) closeIdle(cause error) bool {
	m.mu.Lock()
	if m.closed || len(m.streams) > 0 {
		m.mu.Unlock()
		return false
	}
	m.closed = true
	m.err = cause
	m.mu.Unlock()
	m.wmu.Lock()
	_ = m.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	m.closeConn()
	m.werr = net.ErrClosed
	m.wmu.Unlock()
	m.ended()
	return true
}

// onData handles OPEN and DATA; buf holds the payload (n bytes), which the
// stream keeps until read.
func (m *Conn) onData(typ byte, id uint32, buf *[]byte, n int) error {
	m.mu.Lock()
	if m.closed {
		// The connection ended while this frame was read, or this end closed
		// it and reads on until the peer's end (closeTransport): the frame is
		// dropped. A stream opened now would never be cut, and its reader
		// would wait for ever. A connection that failed has its transport
		// closed already, so the reader stops at its next read.
		m.mu.Unlock()
		putBuf(buf)
		return nil
	}
	s := m.streams[id]
	if typ == FrameOpen {
		switch {
		case m.o.Client:
			m.mu.Unlock()
			putBuf(buf)
			return m.protocolError("the %s opened a stream", m.o.Peer)
		case id <= m.lastID:
			m.mu.Unlock()
			putBuf(buf)
			return m.protocolError("stream %d opened after stream %d", id, m.lastID)
		case len(m.streams) >= m.o.MaxStreams:
			m.mu.Unlock()
			putBuf(buf)
			return m.protocolError("the %s opened more than %d streams at once", m.o.Peer, m.o.MaxStreams)
		}
		m.lastID = id
		m.opened++
		s = newStream(m, id)
		m.streams[id] = s
		m.idleSince = time.Time{}
	}
	known := id <= m.lastID
	m.mu.Unlock()
	if s == nil {
		putBuf(buf)
		if !known {
			return m.protocolError("data for stream %d, which was never opened", id)
		}
		return nil // a stream this end ended already (aborted): its data is dropped
	}
	if err := s.deliver(buf, n); err != nil {
		return err
	}
	if typ == FrameOpen {
		m.amu.RLock()
		defer m.amu.RUnlock()
		if m.Ended() {
			return net.ErrClosed // the connection's end cut s: it is nobody's
		}
		m.accept(s) // starts the stream's own goroutine
	}
	return nil
}

// ended closes done, once no accept runs.
func (m *Conn) ended() {
	m.amu.Lock()
	close(m.done)
	m.amu.Unlock()
}

func (m *Conn) onControl(typ byte, id uint32, p []byte) error {
	if id == 0 {
		switch typ {
		case FramePing:
			if len(p) != 8 {
				return m.protocolError("a ping of %d bytes", len(p))
			}
			m.cmu.Lock()
			m.pong = append(m.pong[:0], p...) // only the latest ping is answered
			m.cmu.Unlock()
			m.wake()
			return nil
		case FramePong:
			return nil
		case FrameGoAway:
			if !m.o.Client {
				return m.protocolError("the %s sent GOAWAY", m.o.Peer)
			}
			m.mu.Lock()
			m.goaway = true
			idle := len(m.streams) == 0
			m.mu.Unlock()
			if idle {
				go m.Close()
			}
			return nil
		}
		return m.protocolError("frame type 0x%02x on stream 0", typ)
	}
	m.mu.Lock()
	s := m.streams[id]
	known := id <= m.lastID
	m.mu.Unlock()
	if !known {
		return m.protocolError("frame type 0x%02x for stream %d, which was never opened", typ, id)
	}
	if s == nil {
		return nil // ended here already
	}
	switch typ {
	case FrameFin:
		if len(p) != 0 {
			return m.protocolError("a FIN with a payload")
		}
		return s.onFin()
	case FrameAbort:
		if len(p) != 1 && len(p) != 2 {
			return m.protocolError("an ABORT of %d bytes", len(p))
		}
		code := -1
		if len(p) == 2 {
			code = int(p[1])
		}
		s.onAbort(p[0], code)
		return nil
	case FrameWindow:
		if len(p) != 4 {
			return m.protocolError("a WINDOW of %d bytes", len(p))
		}
		return s.onWindow(binary.BigEndian.Uint32(p))
	}
	return m.protocolError("unknown frame type 0x%02x", typ)
}

// remove forgets an ended stream.
func (m *Conn) remove(id uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.streams[id]
	if !ok {
		return
	}
	delete(m.streams, id)
	s.mu.Lock()
	m.grown.Add(-int64(s.win - m.o.StreamWindow))
	s.win = m.o.StreamWindow
	s.mu.Unlock()
	if len(m.streams) == 0 {
		m.idleSince = time.Now()
		if m.goaway && !m.closed {
			go m.Close()
		}
	}
}

// Drain sends GOAWAY (the server's end): the client opens no further stream,
// and the connection ends with its last one.
func (m *Conn) Drain() {
	m.mu.Lock()
	if m.goaway || m.closed {
		m.mu.Unlock()
		return
	}
	m.goaway = true
	idle := len(m.streams) == 0
	m.mu.Unlock()
	_ = m.frame(FrameGoAway, 0, nil)
	if idle {
		_ = m.Close()
	}
}

// grow takes n bytes of window growth from the connection's budget.
func (m *Conn) grow(n int) bool {
	if m.grown.Add(int64(n)) > int64(m.o.GrowBudget) {
		m.grown.Add(-int64(n))
		return false
	}
	return true
}

// credit queues more receive window for stream id.
func (m *Conn) credit(id uint32, n uint32) {
	m.cmu.Lock()
	m.credits[id] += n
	m.cmu.Unlock()
	m.wake()
}

func (m *Conn) wake() {
	select {
	case m.cwake <- struct{}{}:
	default:
	}
}

// controlLoop writes queued control frames, pings the server (client), and
// checks the connection's timers.
func (m *Conn) controlLoop() {
	tick := time.NewTicker(m.o.Tick)
	defer tick.Stop()
	var frames []byte
	for {
		select {
		case <-m.done:
			return
		case <-m.cwake:
		case now := <-tick.C:
			if done := m.checkTimers(now); done {
				return
			}
		}
		frames = frames[:0]
		m.cmu.Lock()
		for id, n := range m.credits {
			frames = AppendFrame(frames, FrameWindow, id, binary.BigEndian.AppendUint32(nil, n))
			delete(m.credits, id)
		}
		if len(m.credits) == 0 && len(frames) > 4096 {
			m.credits = map[uint32]uint32{} // a map that grew with many streams shrinks
		}
		if m.pong != nil {
			frames = AppendFrame(frames, FramePong, 0, m.pong)
			m.pong = nil
		}
		if m.ping {
			frames = AppendFrame(frames, FramePing, 0, binary.BigEndian.AppendUint64(nil, uint64(time.Now().UnixNano())))
			m.ping = false
		}
		m.cmu.Unlock()
		if len(frames) > 0 {
			m.wmu.Lock()
			err := m.writeLocked(frames)
			m.wmu.Unlock()
			if err != nil {
				return
			}
		}
		if cap(frames) > 4096 {
			frames = nil
		}
	}
}

// checkTimers runs at every tick; it reports whether the connection ended.
func (m *Conn) checkTimers(now time.Time) bool {
	if now.Sub(time.Unix(0, m.lastRead.Load())) >= m.o.Dead {
		m.Fail(fmt.Errorf("nothing arrived from the %s for %s", m.o.Peer, m.o.Dead))
		return true
	}
	if m.expired(now) {
		m.Fail(errors.New(m.o.ExpiredReason))
		return true
	}
	m.mu.Lock()
	idle := !m.idleSince.IsZero()
	idleFor := now.Sub(m.idleSince)
	old := now.Sub(m.born) >= m.o.Life
	m.mu.Unlock()
	if idle && m.wmu.TryLock() { // no stream: the write buffer goes until the next write
		m.wbuf = nil
		m.wmu.Unlock()
	}
	switch {
	case m.o.Client && idle && (idleFor >= m.o.Idle || old):
		_ = m.Close()
		return true
	case !m.o.Client && idle && idleFor >= m.o.ServerIdle:
		_ = m.Close()
		return true
	case m.o.Client:
		m.cmu.Lock()
		m.ping = true
		m.cmu.Unlock()
	}
	return false
}
