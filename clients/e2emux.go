package clients

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// End-to-end carriers (docs/PROTOCOL.md, section 11.4.1, ALPN tp-e2e-mux/1).
//
// A dialer that reaches the same protected name again keeps one ordinary
// protected session open to it (one TP dial, which tpd authorises and re-checks
// as any other), runs the end-to-end TLS 1.3 session inside it once, and then
// carries every further session to that name as a stream of a small
// multiplexer inside that TLS session: no TP dial, no trip through tpd's dial
// path, no handshake, no key exchange. The agent still checks every stream (the
// dialer's identity from the carrier's handshake, its allow list as it is now,
// its local service) and answers each with a hello of its own, so refusals stay
// readable.
//
// The multiplexer is TP's own, not yamux: a stream that ends because the
// carrier died, or because the other end aborted it, must read as a cut
// (wire.ErrTruncated), never as an end of stream, and yamux's streams read
// io.EOF when their session dies and cannot be reset one by one.

// E2EMuxALPN is the ALPN of an end-to-end TLS session that carries many
// sessions as multiplexed streams.
const E2EMuxALPN = "tp-e2e-mux/1"

// Frame types of the multiplexer. A frame is type (1 byte), stream id (4 bytes,
// big-endian), payload length (2 bytes, big-endian), payload.
const (
	muxOpen   = 0x01 // dialer: a new stream, id above every earlier one; payload: its first bytes
	muxData   = 0x02 // payload: bytes of the stream
	muxFin    = 0x03 // the end of the sender's direction (clean)
	muxAbort  = 0x04 // the stream is cut both ways; payload: one byte, the reason
	muxWindow = 0x05 // payload: 4 bytes, more bytes the sender of this frame will accept
	muxPing   = 0x06 // stream 0; payload: 8 bytes the peer echoes in a pong
	muxPong   = 0x07 // stream 0; the ping's payload
	muxGoAway = 0x08 // stream 0, agent: no further streams on this carrier

	muxAbortCut     = 0x00 // the sender's side failed (its service reset, it gave up)
	muxAbortRefused = 0x01 // agent: the stream was not served (nothing reached the service)

	muxHeaderLen = 7
	// muxMaxPayload keeps a frame within one TLS record of the inner session
	// (what a receiver accepts).
	muxMaxPayload = 16384 - muxHeaderLen
	// muxSendPayload is what TP puts in one frame: with the inner record's
	// header, tag and type (22 bytes) the record is then 16384 bytes, exactly
	// one full record of the outer TLS connection to the relay, so records of
	// both layers line up instead of each inner record taking two outer ones.
	muxSendPayload = 16384 - 22 - muxHeaderLen
	// muxStreamWindow is how many unread bytes each end accepts per stream and
	// direction before the reader grants more.
	muxStreamWindow = 256 << 10
	// muxMaxStreamWindow is how far a stream's window may grow: a reader that
	// takes a quarter of its window within muxGrowWithin of the last grant
	// doubles it, as quic-go's auto-tuning does, while the carrier's budget
	// (muxGrowBudget, summed over its streams) lasts. A relay path through tpd
	// has a round trip of a millisecond or more on a busy machine; 256 KiB in
	// flight would cap a stream near 200 MB/s.
	muxMaxStreamWindow = 4 << 20
	muxGrowBudget      = 16 << 20
	// MuxMaxStreams bounds the open streams of one carrier (both ends): a dialer
	// with this many open opens a further carrier; an agent closes a carrier whose
	// dialer goes beyond it. With muxStreamWindow and muxGrowBudget it bounds
	// what a carrier can make its peer buffer to 80 MiB.
	MuxMaxStreams = 256
	// muxMaxCarriers bounds the carriers a dialer holds to one name.
	muxMaxCarriers = 8
)

// Carrier timers; variables so that tests can shorten them.
var (
	// muxIdle: a dialer closes a carrier that had no open stream for this long.
	muxIdle = 60 * time.Second
	// muxTick is how often a carrier checks its timers; a dialer pings the
	// agent at each tick.
	muxTick = 15 * time.Second
	// muxDead: a carrier that received no frame for this long (the dialer pings
	// every muxTick, and the agent answers) is cut.
	muxDead = 60 * time.Second
	// muxLife: a dialer opens no stream on a carrier older than this (a new one
	// picks up a renewed certificate), and closes it once its streams ended.
	muxLife = time.Hour
	// muxAgentIdle: an agent closes a carrier without streams for this long (a
	// dialer closes its own after muxIdle).
	muxAgentIdle = 2 * time.Minute
	// muxGrowWithin: see muxMaxStreamWindow.
	muxGrowWithin = 5 * time.Millisecond
)

// errMuxFull is a carrier that takes no further stream (full, closing or told
// to go away): the dialer uses another one.
var errMuxFull = errors.New("the end-to-end carrier takes no further stream")

// muxBufs holds the buffers DATA frames are read into until the stream's reader
// took their bytes.
var muxBufs = sync.Pool{New: func() any { b := make([]byte, muxMaxPayload); return &b }}

// muxConn is one end of a carrier: the multiplexer over an end-to-end TLS
// session (conn).
type muxConn struct {
	conn    net.Conn
	client  bool   // the dialer's end: it opens streams
	peer    string // "agent" or "dialer", for errors
	name    string // the full reverse name, for errors
	session string // dialer: the server's id of the carrier's session (for why)
	expires time.Time
	born    time.Time
	// The timers above, as they were when the carrier was made.
	idle, tick, dead, life, agentIdle, growWithin time.Duration
	// accept, on the agent's end, serves a stream the dialer opened: it is
	// called on the reader's goroutine and must start one of its own.
	accept func(*muxStream)

	wmu  sync.Mutex // one frame sequence at a time on conn
	wbuf []byte
	werr error

	mu        sync.Mutex
	streams   map[uint32]*muxStream
	lastID    uint32
	closed    bool
	goaway    bool      // no further stream: GOAWAY sent (agent) or received (dialer); the carrier ends with its last stream
	err       error     // why the carrier ended
	idleSince time.Time // when the last stream ended (zero while streams are open)

	lastRead atomic.Int64 // unix nanoseconds of the last frame read
	grown    atomic.Int64 // window growth of the streams, against muxGrowBudget

	cmu     sync.Mutex // control frames waiting for the writer goroutine
	credits map[uint32]uint32
	pong    []byte
	ping    bool
	cwake   chan struct{}

	done chan struct{}
}

func newMuxConn(conn net.Conn, client bool, name string, expires time.Time, accept func(*muxStream)) *muxConn {
	now := time.Now()
	m := &muxConn{conn: conn, client: client, name: name, expires: expires, born: now, accept: accept,
		streams: map[uint32]*muxStream{}, idleSince: now, credits: map[uint32]uint32{},
		cwake: make(chan struct{}, 1), done: make(chan struct{}),
		idle: muxIdle, tick: muxTick, dead: muxDead, life: muxLife, agentIdle: muxAgentIdle, growWithin: muxGrowWithin}
	m.peer = "dialer"
	if client {
		m.peer = "agent"
	}
	m.lastRead.Store(now.UnixNano())
	go m.readLoop()
	go m.controlLoop()
	return m
}

// Done is closed when the carrier ended.
func (m *muxConn) Done() <-chan struct{} { return m.done }

// ended reports whether the carrier ended.
func (m *muxConn) ended() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// usable says whether a dialer may open a stream on m now.
func (m *muxConn) usable(now time.Time) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.closed && !m.goaway && len(m.streams) < MuxMaxStreams && now.Before(m.expires) && now.Sub(m.born) < m.life
}

// open opens a stream carrying first (the dialer's end only).
func (m *muxConn) open(first []byte) (*muxStream, error) {
	s, err := m.openFrame(first[:min(len(first), muxSendPayload)])
	if err != nil {
		return nil, err
	}
	if rest := first[min(len(first), muxSendPayload):]; len(rest) > 0 {
		if _, err := s.Write(rest); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// openFrame takes the next stream id and writes the stream's OPEN frame with
// head, under one hold of wmu so that ids go out in order.
func (m *muxConn) openFrame(head []byte) (*muxStream, error) {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	m.mu.Lock()
	if m.closed || m.goaway || len(m.streams) >= MuxMaxStreams {
		m.mu.Unlock()
		return nil, errMuxFull
	}
	m.lastID++
	s := newMuxStream(m, m.lastID)
	m.streams[s.id] = s
	m.idleSince = time.Time{}
	m.mu.Unlock()
	s.swin -= len(head)
	m.wbuf = appendMuxFrame(m.wbuf[:0], muxOpen, s.id, head)
	if err := m.writeLocked(m.wbuf); err != nil {
		return nil, err
	}
	return s, nil
}

func appendMuxFrame(dst []byte, typ byte, id uint32, payload []byte) []byte {
	dst = append(dst, typ)
	dst = binary.BigEndian.AppendUint32(dst, id)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(payload)))
	return append(dst, payload...)
}

// writeLocked writes frames to the carrier, with wmu held. A write that cannot
// go out within muxDead means the peer stopped reading the carrier (its reader
// never waits for anything else): the carrier is cut.
func (m *muxConn) writeLocked(b []byte) error {
	if m.werr != nil {
		return m.werr
	}
	_ = m.conn.SetWriteDeadline(time.Now().Add(m.dead))
	if err := m.writeFrames(b); err != nil {
		m.werr = m.fail(fmt.Errorf("writing to the end-to-end carrier: %w", err))
		return m.werr
	}
	return nil
}

// frame writes one frame without payload or with a small one.
func (m *muxConn) frame(typ byte, id uint32, payload []byte) error {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	m.wbuf = appendMuxFrame(m.wbuf[:0], typ, id, payload)
	return m.writeLocked(m.wbuf)
}

// writeData writes p as DATA frames of stream id, each its own record of the
// inner TLS session, in one write of the relay's stream.
func (m *muxConn) writeData(id uint32, p []byte) error {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	m.wbuf = m.wbuf[:0]
	for len(p) > 0 {
		n := min(len(p), muxSendPayload)
		m.wbuf = appendMuxFrame(m.wbuf, muxData, id, p[:n])
		p = p[n:]
	}
	return m.writeLocked(m.wbuf)
}

// writeFrames writes whole frames (b) to the carrier: over an inner TLS
// session, one record per frame and all of them in one write of the relay's
// stream (batchConn).
func (m *muxConn) writeFrames(b []byte) error {
	bt, ok := m.conn.(*batchedTLS)
	if !ok || len(b) <= muxSendPayload+muxHeaderLen {
		_, err := m.conn.Write(b)
		return err
	}
	bt.raw.begin()
	var err error
	for len(b) > 0 && err == nil {
		n := muxHeaderLen + int(binary.BigEndian.Uint16(b[5:7]))
		_, err = bt.Conn.Write(b[:n])
		b = b[n:]
	}
	if ferr := bt.raw.end(); err == nil {
		err = ferr
	}
	return err
}

// protocolError ends the carrier because the peer broke the protocol.
func (m *muxConn) protocolError(format string, args ...any) error {
	return &wire.ProtocolError{Err: fmt.Errorf("end-to-end carrier: "+format, args...)}
}

// fail ends the carrier: every open stream fails with a cut carrying cause.
// It returns the error the carrier ended with (the first cause).
func (m *muxConn) fail(cause error) error {
	m.mu.Lock()
	if m.closed && m.err != nil {
		err := m.err
		m.mu.Unlock()
		return err
	}
	m.closed = true
	m.err = cause
	streams := m.streams
	m.streams = map[uint32]*muxStream{}
	m.mu.Unlock()
	cut := fmt.Errorf("the end-to-end carrier to %s ended (%v): %w", m.name, cause, wire.ErrTruncated)
	for _, s := range streams {
		s.cut(cut)
	}
	var pe *wire.ProtocolError
	if errors.As(cause, &pe) {
		wire.Abort(m.conn, wire.QUICInternal)
	} else {
		wire.Abort(m.conn, wire.QUICPeerReset)
	}
	close(m.done)
	return cause
}

// Close ends a carrier without open streams cleanly (close_notify); streams
// still open are cut.
func (m *muxConn) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	if len(m.streams) > 0 {
		m.mu.Unlock()
		m.fail(errors.New("closed with streams open"))
		return nil
	}
	m.closed = true
	m.err = errors.New("closed")
	m.mu.Unlock()
	m.wmu.Lock()
	_ = m.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	err := m.conn.Close() // close_notify, then the relay's stream ends
	m.werr = net.ErrClosed
	m.wmu.Unlock()
	close(m.done)
	return err
}

// readLoop reads frames until the carrier ends. It never writes (control
// frames go to controlLoop), so a carrier whose both ends write much cannot
// deadlock on full buffers.
func (m *muxConn) readLoop() {
	var hdr [muxHeaderLen]byte
	var small [8]byte
	for {
		if _, err := io.ReadFull(m.conn, hdr[:]); err != nil {
			m.readFailed(err)
			return
		}
		m.lastRead.Store(time.Now().UnixNano())
		typ, id, n := hdr[0], binary.BigEndian.Uint32(hdr[1:5]), int(binary.BigEndian.Uint16(hdr[5:7]))
		if n > muxMaxPayload {
			m.fail(m.protocolError("a frame of %d bytes; at most %d", n, muxMaxPayload))
			return
		}
		var err error
		switch typ {
		case muxOpen, muxData:
			buf := muxBufs.Get().(*[]byte)
			if _, err = io.ReadFull(m.conn, (*buf)[:n]); err == nil {
				err = m.onData(typ, id, buf, n)
			} else {
				muxBufs.Put(buf)
			}
		default:
			if n > len(small) {
				m.fail(m.protocolError("a frame of type 0x%02x with %d bytes", typ, n))
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

func (m *muxConn) readFailed(err error) {
	var pe *wire.ProtocolError
	switch {
	case errors.As(err, &pe):
	case errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF):
		err = fmt.Errorf("the %s closed the carrier", m.peer)
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, wire.ErrTruncated):
		err = fmt.Errorf("the carrier was cut in the middle of a frame: %w", err)
	default:
		err = fmt.Errorf("reading the end-to-end carrier: %w", err)
	}
	m.fail(err)
}

// onData handles OPEN and DATA; buf holds the payload (n bytes), which the
// stream keeps until read.
func (m *muxConn) onData(typ byte, id uint32, buf *[]byte, n int) error {
	m.mu.Lock()
	s := m.streams[id]
	if typ == muxOpen {
		switch {
		case m.client:
			m.mu.Unlock()
			muxBufs.Put(buf)
			return m.protocolError("the agent opened a stream")
		case id <= m.lastID:
			m.mu.Unlock()
			muxBufs.Put(buf)
			return m.protocolError("stream %d opened after stream %d", id, m.lastID)
		case len(m.streams) >= MuxMaxStreams:
			m.mu.Unlock()
			muxBufs.Put(buf)
			return m.protocolError("the dialer opened more than %d streams at once", MuxMaxStreams)
		}
		m.lastID = id
		s = newMuxStream(m, id)
		m.streams[id] = s
		m.idleSince = time.Time{}
	}
	known := id <= m.lastID
	m.mu.Unlock()
	if s == nil {
		muxBufs.Put(buf)
		if !known {
			return m.protocolError("data for stream %d, which was never opened", id)
		}
		return nil // a stream this end ended already (aborted): its data is dropped
	}
	if err := s.deliver(buf, n); err != nil {
		return err
	}
	if typ == muxOpen {
		m.accept(s) // starts the stream's own goroutine
	}
	return nil
}

func (m *muxConn) onControl(typ byte, id uint32, p []byte) error {
	if id == 0 {
		switch typ {
		case muxPing:
			if len(p) != 8 {
				return m.protocolError("a ping of %d bytes", len(p))
			}
			m.cmu.Lock()
			m.pong = append(m.pong[:0], p...) // only the latest ping is answered
			m.cmu.Unlock()
			m.wake()
			return nil
		case muxPong:
			return nil
		case muxGoAway:
			if !m.client {
				return m.protocolError("the dialer sent GOAWAY")
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
	case muxFin:
		if len(p) != 0 {
			return m.protocolError("a FIN with a payload")
		}
		return s.onFin()
	case muxAbort:
		if len(p) != 1 {
			return m.protocolError("an ABORT of %d bytes", len(p))
		}
		s.onAbort(p[0])
		return nil
	case muxWindow:
		if len(p) != 4 {
			return m.protocolError("a WINDOW of %d bytes", len(p))
		}
		return s.onWindow(binary.BigEndian.Uint32(p))
	}
	return m.protocolError("unknown frame type 0x%02x", typ)
}

// remove forgets an ended stream.
func (m *muxConn) remove(id uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.streams[id]
	if !ok {
		return
	}
	delete(m.streams, id)
	s.mu.Lock()
	m.grown.Add(-int64(s.win - muxStreamWindow))
	s.win = muxStreamWindow
	s.mu.Unlock()
	if len(m.streams) == 0 {
		m.idleSince = time.Now()
		if m.goaway && !m.closed {
			go m.Close()
		}
	}
}

// drain sends GOAWAY (the agent's end): the dialer opens no further stream,
// and the carrier ends with its last one.
func (m *muxConn) drain() {
	m.mu.Lock()
	if m.goaway || m.closed {
		m.mu.Unlock()
		return
	}
	m.goaway = true
	idle := len(m.streams) == 0
	m.mu.Unlock()
	_ = m.frame(muxGoAway, 0, nil)
	if idle {
		_ = m.Close()
	}
}

// grow takes n bytes of window growth from the carrier's budget.
func (m *muxConn) grow(n int) bool {
	if m.grown.Add(int64(n)) > muxGrowBudget {
		m.grown.Add(-int64(n))
		return false
	}
	return true
}

// credit queues more receive window for stream id.
func (m *muxConn) credit(id uint32, n uint32) {
	m.cmu.Lock()
	m.credits[id] += n
	m.cmu.Unlock()
	m.wake()
}

func (m *muxConn) wake() {
	select {
	case m.cwake <- struct{}{}:
	default:
	}
}

// controlLoop writes queued control frames, pings the agent (dialer), and
// checks the carrier's timers.
func (m *muxConn) controlLoop() {
	tick := time.NewTicker(m.tick)
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
			frames = appendMuxFrame(frames, muxWindow, id, binary.BigEndian.AppendUint32(nil, n))
			delete(m.credits, id)
		}
		if m.pong != nil {
			frames = appendMuxFrame(frames, muxPong, 0, m.pong)
			m.pong = nil
		}
		if m.ping {
			frames = appendMuxFrame(frames, muxPing, 0, binary.BigEndian.AppendUint64(nil, uint64(time.Now().UnixNano())))
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
	}
}

// checkTimers runs at every tick; it reports whether the carrier ended.
func (m *muxConn) checkTimers(now time.Time) bool {
	if now.Sub(time.Unix(0, m.lastRead.Load())) >= m.dead {
		m.fail(fmt.Errorf("nothing arrived from the %s for %s", m.peer, m.dead))
		return true
	}
	if !now.Before(m.expires) {
		m.fail(errors.New("a certificate of the end-to-end session expired"))
		return true
	}
	m.mu.Lock()
	idle := !m.idleSince.IsZero()
	idleFor := now.Sub(m.idleSince)
	old := now.Sub(m.born) >= m.life
	m.mu.Unlock()
	switch {
	case m.client && idle && (idleFor >= m.idle || old):
		_ = m.Close()
		return true
	case !m.client && idle && idleFor >= m.agentIdle:
		_ = m.Close()
		return true
	case m.client:
		m.cmu.Lock()
		m.ping = true
		m.cmu.Unlock()
	}
	return false
}

// muxStream is one session on a carrier: a wire.Stream whose end is a cut
// (wire.ErrTruncated) unless the peer ended its direction with FIN.
type muxStream struct {
	m  *muxConn
	id uint32

	wmu sync.Mutex // one Write at a time

	mu        sync.Mutex
	rq        []*[]byte // received payloads, in order; rq[0][roff:rlen0] unread
	rlens     []int
	roff      int
	rwin      int    // bytes the peer may still send before more credit
	consumed  uint32 // read since the last credit
	win       int    // the receive window (grows, muxMaxStreamWindow)
	lastGrant time.Time
	rfin      bool  // the peer's FIN arrived
	rerr      error // the stream was cut, for reads
	swin      int   // bytes this end may still send
	wfin      bool  // FIN sent
	werr      error // the stream was cut, for writes
	closed    bool  // Close was called
	rdeadline time.Time
	wdeadline time.Time
	rtimer    *time.Timer
	wtimer    *time.Timer
	rwake     chan struct{}
	wwake     chan struct{}
}

var (
	_ wire.Stream = (*muxStream)(nil)
	_ interface {
		Abort(quic.ApplicationErrorCode)
	} = (*muxStream)(nil)
)

func newMuxStream(m *muxConn, id uint32) *muxStream {
	return &muxStream{m: m, id: id, rwin: muxStreamWindow, swin: muxStreamWindow, win: muxStreamWindow,
		rwake: make(chan struct{}, 1), wwake: make(chan struct{}, 1)}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// deliver queues a received payload (buf[:n]).
func (s *muxStream) deliver(buf *[]byte, n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.rfin:
		muxBufs.Put(buf)
		return s.m.protocolError("data on stream %d after its FIN", s.id)
	case n > s.rwin:
		muxBufs.Put(buf)
		return s.m.protocolError("%d bytes on stream %d beyond its window (%d)", n, s.id, s.rwin)
	case s.rerr != nil || s.closed:
		muxBufs.Put(buf) // no longer read here
		return nil
	case n == 0:
		muxBufs.Put(buf)
		return nil
	}
	s.rwin -= n
	s.rq = append(s.rq, buf)
	s.rlens = append(s.rlens, n)
	signal(s.rwake)
	return nil
}

func (s *muxStream) onFin() error {
	s.mu.Lock()
	if s.rfin {
		s.mu.Unlock()
		return s.m.protocolError("a second FIN on stream %d", s.id)
	}
	s.rfin = true
	done := s.wfin || s.werr != nil
	s.mu.Unlock()
	signal(s.rwake)
	if done {
		s.m.remove(s.id)
	}
	return nil
}

func (s *muxStream) onAbort(reason byte) {
	why := "the " + s.m.peer + " aborted the stream"
	if reason == muxAbortRefused {
		why = "the agent refused the stream (it holds as many as it serves)"
	}
	err := fmt.Errorf("end-to-end stream to %s: %s: %w", s.m.name, why, wire.ErrTruncated)
	if s.m.peer == "agent" && reason != muxAbortRefused {
		// The carrier lives on, so the server has no record of this cut: the
		// agent's ABORT is the answer to "why" (section 11.4.1).
		err = &muxAbortError{err: err, end: wire.SessionEnd{Code: wire.EndPeerReset, By: "agent",
			Reason: "the exposed service's side of the session to " + s.m.name + " was cut off (the service reset the connection, or the agent gave up on it)"}}
	}
	s.cut(err)
	s.m.remove(s.id)
}

// muxAbortError is a stream cut by the agent's ABORT: it says who cut it
// without asking the server, which saw nothing of the stream.
type muxAbortError struct {
	err error
	end wire.SessionEnd
}

func (e *muxAbortError) Error() string { return e.err.Error() }
func (e *muxAbortError) Unwrap() error { return e.err }

// cut fails both directions with err (data already received stays readable).
func (s *muxStream) cut(err error) {
	s.mu.Lock()
	if s.rerr == nil {
		s.rerr = err
	}
	if s.werr == nil {
		s.werr = err
	}
	s.mu.Unlock()
	signal(s.rwake)
	signal(s.wwake)
}

func (s *muxStream) onWindow(n uint32) error {
	s.mu.Lock()
	if s.swin+int(n) > muxMaxStreamWindow {
		s.mu.Unlock()
		return s.m.protocolError("the window of stream %d grew beyond %d bytes", s.id, muxMaxStreamWindow)
	}
	s.swin += int(n)
	s.mu.Unlock()
	signal(s.wwake)
	return nil
}

func (s *muxStream) Read(p []byte) (int, error) {
	for {
		s.mu.Lock()
		if len(s.rq) > 0 {
			n := 0
			for len(s.rq) > 0 && n < len(p) { // as many queued frames as p holds
				c := copy(p[n:], (*s.rq[0])[s.roff:s.rlens[0]])
				n += c
				s.roff += c
				if s.roff == s.rlens[0] {
					muxBufs.Put(s.rq[0])
					s.rq[0] = nil
					s.rq, s.rlens, s.roff = s.rq[1:], s.rlens[1:], 0
				}
			}
			if len(s.rq) == 0 {
				s.rq, s.rlens = nil, nil // let go of the backing arrays while idle
			}
			s.consumed += uint32(n)
			var grant uint32
			if int(s.consumed) >= s.win/4 && !s.rfin && s.rerr == nil {
				grant, s.consumed = s.consumed, 0
				now := time.Now()
				if s.win < muxMaxStreamWindow && now.Sub(s.lastGrant) < s.m.growWithin && s.m.grow(s.win) {
					grant += uint32(s.win) // the window doubles
					s.win *= 2
				}
				s.lastGrant = now
				s.rwin += int(grant)
			}
			s.mu.Unlock()
			if grant > 0 {
				s.m.credit(s.id, grant)
			}
			return n, nil
		}
		switch {
		case s.rfin:
			s.mu.Unlock()
			return 0, io.EOF
		case s.rerr != nil:
			err := s.rerr
			s.mu.Unlock()
			return 0, err
		case s.closed:
			s.mu.Unlock()
			return 0, net.ErrClosed
		case !s.rdeadline.IsZero() && !time.Now().Before(s.rdeadline):
			s.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		}
		s.mu.Unlock()
		<-s.rwake
	}
}

func (s *muxStream) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	written := 0
	for written < len(p) {
		s.mu.Lock()
		switch {
		case s.werr != nil:
			err := s.werr
			s.mu.Unlock()
			return written, err
		case s.wfin || s.closed:
			s.mu.Unlock()
			return written, net.ErrClosed
		case !s.wdeadline.IsZero() && !time.Now().Before(s.wdeadline):
			s.mu.Unlock()
			return written, os.ErrDeadlineExceeded
		case s.swin == 0:
			s.mu.Unlock()
			<-s.wwake
			continue
		}
		n := min(len(p)-written, s.swin, 4*muxSendPayload)
		s.swin -= n
		s.mu.Unlock()
		if err := s.m.writeData(s.id, p[written:written+n]); err != nil {
			return written, fmt.Errorf("end-to-end stream to %s: %w", s.m.name, err)
		}
		written += n
	}
	return written, nil
}

// CloseWrite sends FIN: the clean end of this direction.
func (s *muxStream) CloseWrite() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	if s.wfin || s.werr != nil {
		err := s.werr
		s.mu.Unlock()
		return err
	}
	s.wfin = true
	done := s.rfin || s.rerr != nil
	s.mu.Unlock()
	err := s.m.frame(muxFin, s.id, nil)
	if done {
		s.m.remove(s.id)
	}
	return err
}

// Close ends the stream: FIN for an open write direction, and ABORT when the
// peer's direction has not ended (what it still sends is not read: its writes
// fail, as a TCP reset would make them).
func (s *muxStream) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	readOpen := !s.rfin && s.rerr == nil
	writeOpen := !s.wfin && s.werr == nil
	s.dropReceivedLocked()
	s.mu.Unlock()
	signal(s.rwake)
	signal(s.wwake)
	if writeOpen {
		s.wmu.Lock()
		s.mu.Lock()
		s.wfin = true
		s.mu.Unlock()
		_ = s.m.frame(muxFin, s.id, nil)
		s.wmu.Unlock()
	}
	if readOpen {
		_ = s.m.frame(muxAbort, s.id, []byte{muxAbortCut})
	}
	s.m.remove(s.id)
	return nil
}

func (s *muxStream) dropReceivedLocked() {
	for _, b := range s.rq {
		muxBufs.Put(b)
	}
	s.rq, s.rlens, s.roff = nil, nil, 0
}

// Abort cuts the stream both ways: the peer reads an error, never an end.
func (s *muxStream) Abort(quic.ApplicationErrorCode) { s.abort(muxAbortCut) }

func (s *muxStream) abort(reason byte) {
	s.mu.Lock()
	sent := s.closed && s.werr != nil
	if s.werr == nil {
		s.werr = net.ErrClosed
	}
	if s.rerr == nil {
		s.rerr = net.ErrClosed
	}
	s.closed = true
	s.dropReceivedLocked()
	s.mu.Unlock()
	signal(s.rwake)
	signal(s.wwake)
	if !sent {
		_ = s.m.frame(muxAbort, s.id, []byte{reason})
	}
	s.m.remove(s.id)
}

func (s *muxStream) LocalAddr() net.Addr  { return s.m.conn.LocalAddr() }
func (s *muxStream) RemoteAddr() net.Addr { return s.m.conn.RemoteAddr() }

func (s *muxStream) SetDeadline(t time.Time) error {
	_ = s.SetReadDeadline(t)
	return s.SetWriteDeadline(t)
}

func (s *muxStream) SetReadDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rdeadline = t
	s.rtimer = rearm(s.rtimer, t, s.rwake)
	signal(s.rwake)
	return nil
}

func (s *muxStream) SetWriteDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.wdeadline = t
	s.wtimer = rearm(s.wtimer, t, s.wwake)
	signal(s.wwake)
	return nil
}

// rearm stops timer and, for a deadline in the future, starts one that wakes c
// at t.
func rearm(timer *time.Timer, t time.Time, c chan struct{}) *time.Timer {
	if timer != nil {
		timer.Stop()
	}
	if t.IsZero() {
		return nil
	}
	d := time.Until(t)
	if d <= 0 {
		return nil
	}
	return time.AfterFunc(d, func() { signal(c) })
}
