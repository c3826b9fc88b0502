package wire

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/quicvarint"
)

// DefaultUDPQueueLen bounds the datagrams a flow holds that its reader has not
// taken yet; further QUIC datagrams are dropped and counted (QueueFull).
const DefaultUDPQueueLen = 128

// ErrDatagramTooLarge is returned by UDPFlow.Write for a payload larger than
// MaxDatagramSize.
var ErrDatagramTooLarge = errors.New("datagram larger than 65535 bytes")

// UDPFlow is one UDP flow carried by a TP request (op "dial", net "udp"). It is a
// net.Conn with datagram semantics, like a connected *net.UDPConn: each Write
// sends one datagram, each Read returns one (io.ErrShortBuffer if p is too small
// for it). Over QUIC with datagram support, datagrams travel in DATAGRAM frames
// tagged with the flow id, and those too large for a DATAGRAM frame on the current
// path travel as capsules on the request's stream (counted as Oversize); otherwise
// every datagram is a capsule on the stream. The flow ends when either side
// closes the stream.
type UDPFlow struct {
	str Stream
	br  *bufio.Reader

	mu     sync.Mutex
	dg     datagramSender // nil: capsules on the stream only
	qconn  *quic.Conn     // dg's QUIC connection, when it is one (DatagramConn)
	flow   uint64
	prefix []byte // the flow id as a QUIC varint
	mux    *datagramMux

	in      chan []byte
	done    chan struct{} // closed by Close
	ended   chan struct{} // closed when the stream's read side ends
	endErr  error         // why, set before ended is closed
	once    sync.Once
	started atomic.Bool
	// waiting: the peer may not have registered the flow id yet (AwaitPeer), so
	// datagrams go as capsules until the first one arrives from the peer.
	waiting atomic.Bool

	wmu      sync.Mutex // serialises capsules on str
	kick     chan struct{}
	onReport atomic.Pointer[func(UDPReport)]

	dmu      sync.Mutex // read deadline
	deadline time.Time
	dchanged chan struct{}

	stats flowCounters
}

var _ net.Conn = (*UDPFlow)(nil)

// UDPFlowStats are a flow's counters.
type UDPFlowStats struct {
	DatagramsIn, DatagramsOut int64 // received from / sent to the peer
	BytesIn, BytesOut         int64
	// Oversize counts datagrams too large for a QUIC DATAGRAM frame that were sent
	// as capsules on the stream instead (not lost).
	Oversize int64
	// TooLarge and QueueFull count datagrams this end dropped (see UDPReport).
	TooLarge, QueueFull int64
	// Largest is the largest datagram dropped as too large.
	Largest int64
	// Peer is the peer's last report of datagrams it dropped.
	Peer UDPReport
}

type flowCounters struct {
	dgIn, dgOut, bIn, bOut, oversize, tooLarge, queueFull, largest atomic.Int64
	peer                                                           atomic.Pointer[UDPReport]
}

// QUICStreamer is a QUIC stream adapter: *QUICStream, or a wrapper embedding one.
type QUICStreamer interface {
	Conn() *quic.Conn
	StreamID() quic.StreamID
}

// StreamID is the QUIC stream's id.
func (s *QUICStream) StreamID() quic.StreamID { return s.str.StreamID() }

// NewUDPFlow prepares a flow on str, a request's stream whose hello exchange is
// under way. On a QUIC stream whose connection negotiated datagrams it registers
// the flow id (the stream id divided by 4, as in RFC 9297) so that datagrams
// arriving as soon as the peer learns of the flow are not lost. Call Start once
// the hellos are exchanged; Close releases the flow. queueLen ≤ 0 means
// DefaultUDPQueueLen; onReport (may be nil) receives the peer's drop reports.
func NewUDPFlow(str Stream, queueLen int, onReport func(UDPReport)) (*UDPFlow, error) {
	f := newUDPFlow(str, queueLen, onReport)
	if qs, ok := str.(QUICStreamer); ok {
		conn := qs.Conn()
		if st := conn.ConnectionState().SupportsDatagrams; st.Local && st.Remote {
			f.dg, f.qconn, f.flow = conn, conn, uint64(qs.StreamID())/4
			f.prefix = quicvarint.Append(nil, f.flow)
			f.mux = muxFor(conn)
			if err := f.mux.add(f.flow, f); err != nil {
				return nil, err
			}
		}
	}
	if sd, ok := str.(sessionDatagrammer); ok {
		if d, id := sd.SessionDatagrams(); d != nil {
			f.dg, f.flow = d, id
			f.prefix = quicvarint.Append(nil, id)
			f.mux = d.mux
			if err := f.mux.add(f.flow, f); err != nil {
				return nil, err
			}
		}
	}
	return f, nil
}

// datagramSender sends one datagram outside a flow's stream (a copy of b).
type datagramSender interface{ SendDatagram(b []byte) error }

// sessionDatagrammer is a stream of a session that carries its flows'
// datagrams apart from its streams (a WebTransport session's: WTStream).
type sessionDatagrammer interface {
	// SessionDatagrams is the session's datagrams (nil: none) and the flow
	// id of a flow on this stream.
	SessionDatagrams() (*SessionDatagrams, uint64)
}

// SessionDatagrams are the datagrams of one session (a WebTransport
// session's HTTP Datagrams): each carries a flow id and a UDP payload, as a
// QUIC DATAGRAM frame of a tp/1 connection does (docs/PROTOCOL.md 12.3,
// 14.2), and reaches the flow of that id.
type SessionDatagrams struct {
	send func([]byte) error
	mux  *datagramMux
}

// NewSessionDatagrams serves a session's datagrams until ctx ends: recv
// reads the next one, send sends one.
func NewSessionDatagrams(ctx context.Context, send func([]byte) error, recv func(context.Context) ([]byte, error)) *SessionDatagrams {
	m := &datagramMux{flows: make(map[uint64]*UDPFlow)}
	go func() {
		for {
			d, err := recv(ctx)
			if err != nil {
				return
			}
			m.dispatch(d)
		}
	}()
	return &SessionDatagrams{send: send, mux: m}
}

// SendDatagram sends b, a flow id and a payload.
func (d *SessionDatagrams) SendDatagram(b []byte) error { return d.send(b) }

// Unknown counts the datagrams that named no live flow.
func (d *SessionDatagrams) Unknown() int64 { return d.mux.unknown.Load() }

// newUDPFlow is a flow that sends capsules on str only.
func newUDPFlow(str Stream, queueLen int, onReport func(UDPReport)) *UDPFlow {
	if queueLen <= 0 {
		queueLen = DefaultUDPQueueLen
	}
	f := &UDPFlow{
		str:      str,
		in:       make(chan []byte, queueLen),
		done:     make(chan struct{}),
		ended:    make(chan struct{}),
		kick:     make(chan struct{}, 1),
		dchanged: make(chan struct{}),
	}
	if onReport != nil {
		f.onReport.Store(&onReport)
	}
	return f
}

// AwaitPeer makes Write send capsules on the stream until a datagram arrives
// from the peer: for a flow the peer learns of from a header on the stream (a
// public UDP session the server opens to an agent), DATAGRAM frames sent before
// the peer has read that header would find no flow and be lost.
func (f *UDPFlow) AwaitPeer() { f.waiting.Store(true) }

// DatagramConn is the QUIC connection that carries f's DATAGRAM frames; nil when
// f sends capsules on its stream only.
func (f *UDPFlow) DatagramConn() *quic.Conn {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.qconn
}

// FlowID reports the flow id when datagrams travel apart from the stream
// (QUIC DATAGRAM frames, or a session's datagrams).
func (f *UDPFlow) FlowID() (uint64, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.flow, f.dg != nil
}

// UseFlowID applies the server's answer: the flow id it named, or nil when it
// sends capsules on the stream only. A client calls it before Start.
func (f *UDPFlow) UseFlowID(id *uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case id == nil && f.dg != nil:
		f.mux.remove(f.flow, f)
		f.dg, f.qconn, f.mux = nil, nil, nil
	case id != nil && f.dg == nil:
		return &ProtocolError{errors.New("the server named a datagram flow id, but this connection has no QUIC datagrams")}
	case id != nil && *id != f.flow:
		return &ProtocolError{fmt.Errorf("the server named flow id %d; this stream's is %d", *id, f.flow)}
	}
	return nil
}

// OnReport sets the function that receives the peer's drop reports.
func (f *UDPFlow) OnReport(fn func(UDPReport)) { f.onReport.Store(&fn) }

// Start begins reading capsules from the stream. The hello exchange must be over.
func (f *UDPFlow) Start() {
	if !f.started.CompareAndSwap(false, true) {
		return
	}
	f.br = bufio.NewReaderSize(f.str, 16<<10)
	go f.readStream()
	go f.reporter()
}

func (f *UDPFlow) readStream() {
	var err error
	for {
		var typ byte
		var d []byte
		typ, d, err = ReadCapsule(f.br)
		if err != nil {
			break
		}
		switch typ {
		case CapsuleDatagram:
			f.waiting.Store(false)
			select { // capsules wait for room: the stream's flow control pushes back
			case f.in <- d:
			case <-f.done:
				err = net.ErrClosed
			}
		case CapsuleReport:
			r, rerr := DecodeReport(d)
			if errors.Is(rerr, ErrReportVersion) {
				continue // ignored, as the protocol asks
			}
			if rerr != nil {
				err = &ProtocolError{rerr}
				break
			}
			f.stats.peer.Store(&r)
			if fn := f.onReport.Load(); fn != nil {
				(*fn)(r)
			}
		} // other capsule types are skipped: later versions may add some
		if err != nil {
			break
		}
	}
	f.endErr = err
	close(f.ended)
}

// deliver queues a datagram that arrived in a DATAGRAM frame; a full queue drops it.
func (f *UDPFlow) deliver(d []byte) {
	f.waiting.Store(false)
	select {
	case f.in <- d:
	default:
		f.stats.queueFull.Add(1)
		f.kickReport()
	}
}

// Read returns the next datagram. It returns io.EOF once the peer ended the flow.
func (f *UDPFlow) Read(p []byte) (int, error) {
	d, err := f.ReadDatagram()
	if err != nil {
		return 0, err
	}
	n := copy(p, d)
	if n < len(d) {
		return n, io.ErrShortBuffer
	}
	return n, nil
}

// ReadDatagram returns the next datagram as received, without a copy, and counts
// it in Stats. The slice is the caller's. It returns io.EOF once the peer ended
// the flow.
func (f *UDPFlow) ReadDatagram() ([]byte, error) {
	d, err := f.readDatagram()
	if err == nil {
		f.stats.dgIn.Add(1)
		f.stats.bIn.Add(int64(len(d)))
	}
	return d, err
}

func (f *UDPFlow) readDatagram() ([]byte, error) {
	for {
		f.dmu.Lock()
		dl, changed := f.deadline, f.dchanged
		f.dmu.Unlock()
		var timeout <-chan time.Time
		if !dl.IsZero() {
			wait := time.Until(dl)
			if wait <= 0 {
				return nil, os.ErrDeadlineExceeded
			}
			t := time.NewTimer(wait)
			timeout = t.C
			defer t.Stop()
		}
		select {
		case d := <-f.in:
			return d, nil
		default:
		}
		select {
		case d := <-f.in:
			return d, nil
		case <-f.ended:
			select { // what arrived before the end is still delivered
			case d := <-f.in:
				return d, nil
			default:
			}
			if f.endErr == nil || errors.Is(f.endErr, io.EOF) {
				return nil, io.EOF
			}
			return nil, f.endErr
		case <-f.done:
			return nil, net.ErrClosed
		case <-timeout:
			return nil, os.ErrDeadlineExceeded
		case <-changed:
		}
	}
}

var datagramBufs = sync.Pool{New: func() any { b := make([]byte, 0, 1500); return &b }}

// Write sends p as one datagram.
func (f *UDPFlow) Write(p []byte) (int, error) {
	if len(p) > MaxDatagramSize {
		f.NoteTooLarge(len(p))
		return 0, ErrDatagramTooLarge
	}
	f.mu.Lock()
	dg, prefix := f.dg, f.prefix
	f.mu.Unlock()
	if dg != nil && !f.waiting.Load() {
		bp := datagramBufs.Get().(*[]byte)
		b := append(append((*bp)[:0], prefix...), p...)
		err := dg.SendDatagram(b) // copies b
		*bp = b[:0]
		datagramBufs.Put(bp)
		var tl *quic.DatagramTooLargeError
		switch {
		case err == nil:
			f.sent(len(p))
			return len(p), nil
		case errors.As(err, &tl):
			f.stats.oversize.Add(1) // fits no DATAGRAM frame on this path: the stream takes it
		default:
			return 0, &net.OpError{Op: "write", Net: "quic", Source: f.LocalAddr(), Addr: f.RemoteAddr(), Err: &QUICConnError{Err: err}}
		}
	}
	f.wmu.Lock()
	err := WriteCapsule(f.str, CapsuleDatagram, p)
	f.wmu.Unlock()
	if err != nil {
		return 0, err
	}
	f.sent(len(p))
	return len(p), nil
}

func (f *UDPFlow) sent(n int) {
	f.stats.dgOut.Add(1)
	f.stats.bOut.Add(int64(n))
}

// NoteTooLarge counts a datagram of size bytes dropped as too large for its path
// and reports it to the peer.
func (f *UDPFlow) NoteTooLarge(size int) {
	f.stats.tooLarge.Add(1)
	for {
		cur := f.stats.largest.Load()
		if int64(size) <= cur || f.stats.largest.CompareAndSwap(cur, int64(size)) {
			break
		}
	}
	f.kickReport()
}

// NoteQueueFull counts a datagram for this flow dropped because a queue in front
// of it was full, and reports it to the peer.
func (f *UDPFlow) NoteQueueFull() {
	f.stats.queueFull.Add(1)
	f.kickReport()
}

func (f *UDPFlow) kickReport() {
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

// reporter sends the drop counters to the peer after a drop, at most once a
// second, on the stream (reliable, unlike the datagrams it reports on).
func (f *UDPFlow) reporter() {
	for {
		select {
		case <-f.kick:
		case <-f.done:
			return
		}
		r := UDPReport{V: Version, TooLarge: f.stats.tooLarge.Load(), QueueFull: f.stats.queueFull.Load(), Largest: int(f.stats.largest.Load())}
		body, _ := json.Marshal(r)
		_ = f.str.SetWriteDeadline(time.Now().Add(HelloWriteTimeout))
		f.wmu.Lock()
		err := WriteCapsule(f.str, CapsuleReport, body)
		f.wmu.Unlock()
		_ = f.str.SetWriteDeadline(time.Time{})
		if err != nil {
			return
		}
		select {
		case <-time.After(time.Second):
		case <-f.done:
			return
		}
	}
}

// Stats returns the flow's counters.
func (f *UDPFlow) Stats() UDPFlowStats {
	s := UDPFlowStats{
		DatagramsIn: f.stats.dgIn.Load(), DatagramsOut: f.stats.dgOut.Load(),
		BytesIn: f.stats.bIn.Load(), BytesOut: f.stats.bOut.Load(),
		Oversize: f.stats.oversize.Load(), TooLarge: f.stats.tooLarge.Load(),
		QueueFull: f.stats.queueFull.Load(), Largest: f.stats.largest.Load(),
	}
	if p := f.stats.peer.Load(); p != nil {
		s.Peer = *p
	}
	return s
}

// Ended is closed when the peer ended the flow (or its stream failed).
func (f *UDPFlow) Ended() <-chan struct{} { return f.ended }

// Close ends the flow: the stream is closed in both directions.
func (f *UDPFlow) Close() error {
	f.once.Do(func() {
		close(f.done)
		f.mu.Lock()
		if f.mux != nil {
			f.mux.remove(f.flow, f)
		}
		f.mu.Unlock()
		_ = f.str.Close()
	})
	return nil
}

// Abort resets the flow's stream with code (see Abort) and closes the flow: the
// peer sees the flow cut off, not ended.
func (f *UDPFlow) Abort(code quic.ApplicationErrorCode) {
	Abort(f.str, code)
	_ = f.Close()
}

func (f *UDPFlow) LocalAddr() net.Addr  { return f.str.LocalAddr() }
func (f *UDPFlow) RemoteAddr() net.Addr { return f.str.RemoteAddr() }

func (f *UDPFlow) SetDeadline(t time.Time) error {
	_ = f.SetReadDeadline(t)
	return f.SetWriteDeadline(t)
}

func (f *UDPFlow) SetReadDeadline(t time.Time) error {
	f.dmu.Lock()
	f.deadline = t
	close(f.dchanged)
	f.dchanged = make(chan struct{})
	f.dmu.Unlock()
	return nil
}

// SetWriteDeadline bounds writes of capsules on the stream (DATAGRAM frames never block long).
func (f *UDPFlow) SetWriteDeadline(t time.Time) error { return f.str.SetWriteDeadline(t) }

// datagramMux hands the DATAGRAM frames of one QUIC connection to its flows.
// quic-go has one datagram receive queue per connection, so there is exactly one
// mux per connection in the process.
type datagramMux struct {
	conn    *quic.Conn
	mu      sync.Mutex
	flows   map[uint64]*UDPFlow
	unknown atomic.Int64 // datagrams for no live flow, or malformed
	// noFlow also counts them, for the server that owns the connection
	// (UDPFlow.CountNoFlow).
	noFlow atomic.Pointer[atomic.Int64]
}

var muxes = struct {
	sync.Mutex
	m map[*quic.Conn]*datagramMux
}{m: make(map[*quic.Conn]*datagramMux)}

func muxFor(conn *quic.Conn) *datagramMux {
	muxes.Lock()
	defer muxes.Unlock()
	if m, ok := muxes.m[conn]; ok {
		return m
	}
	m := &datagramMux{conn: conn, flows: make(map[uint64]*UDPFlow)}
	muxes.m[conn] = m
	go m.run()
	return m
}

func (m *datagramMux) run() {
	defer func() {
		muxes.Lock()
		delete(muxes.m, m.conn)
		muxes.Unlock()
	}()
	for {
		d, err := m.conn.ReceiveDatagram(m.conn.Context())
		if err != nil {
			return
		}
		m.dispatch(d)
	}
}

// dispatch hands a DATAGRAM frame's payload to the flow its id names; a frame
// without a complete id or for no live flow is counted and dropped. An empty
// frame is a client's nudge after a silence (docs/PROTOCOL.md section 9.7):
// dropped, not counted.
func (m *datagramMux) dispatch(d []byte) {
	if len(d) == 0 {
		return
	}
	id, n, err := quicvarint.Parse(d)
	var f *UDPFlow
	if err == nil {
		m.mu.Lock()
		f = m.flows[id]
		m.mu.Unlock()
	}
	if f == nil {
		m.unknown.Add(1)
		if c := m.noFlow.Load(); c != nil {
			c.Add(1)
		}
		return
	}
	f.deliver(d[n:])
}

// CountNoFlow makes c count the DATAGRAM frames that reach f's QUIC
// connection for no live flow (DatagramDropCounter.NoFlow), from now on and
// after f ended: a datagram a client sent just before it closed its flow
// arrives late, and is dropped with a count. Nothing for a flow without
// datagrams.
func (f *UDPFlow) CountNoFlow(c *DatagramDropCounter) {
	if f.mux != nil {
		f.mux.noFlow.Store(&c.noFlow)
	}
}

func (m *datagramMux) add(id uint64, f *UDPFlow) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, dup := m.flows[id]; dup {
		return fmt.Errorf("flow id %d is in use on this connection", id)
	}
	m.flows[id] = f
	return nil
}

func (m *datagramMux) remove(id uint64, f *UDPFlow) {
	m.mu.Lock()
	if m.flows[id] == f {
		delete(m.flows, id)
	}
	m.mu.Unlock()
}

// NewCapsuleFlow is a flow on str that carries every datagram as a capsule on
// str, never in QUIC DATAGRAM frames: for a stream that is not a QUIC stream of
// its own, such as the end-to-end TLS session of a protected UDP reverse name.
// queueLen ≤ 0 means DefaultUDPQueueLen. Call Start before use; Close closes str.
func NewCapsuleFlow(str Stream, queueLen int) *UDPFlow { return newUDPFlow(str, queueLen, nil) }
