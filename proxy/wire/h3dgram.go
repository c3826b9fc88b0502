package wire

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"
)

// H3Datagrams reads the HTTP Datagrams (RFC 9297) of one QUIC connection
// below quic-go's http3 and hands each to the request stream its quarter
// stream ID names, on a queue of that stream's own size.
//
// Why: http3 moves each datagram from the connection's queue (128 in quic-go)
// onto a queue of 32 per stream and drops beyond it without a count. Under a
// TCP burst through CONNECT-IP that queue lost about a quarter of the packets
// (docs/IP.md). quic-go's own reader keeps running (it starts whenever the
// peer announces SETTINGS_H3_DATAGRAM), so a datagram may still reach a stream
// through http3: each flow also drains its http3 stream onto the same queue.
//
// All HTTP Datagram users of a connection must take their datagrams from here
// once a flow is registered: this reader also takes those of other streams,
// which it drops (counted in Unknown).
type H3Datagrams struct {
	conn    *quic.Conn
	mu      sync.Mutex
	flows   map[uint64]*H3DatagramFlow // by quarter stream ID
	started bool
	unknown atomic.Int64
	// early > 0: up to early datagrams for streams with no flow yet wait in
	// pending for their flow (a server's; a client registers its flow before
	// it sends its request).
	early    int
	pending  map[uint64][][]byte
	npending int
	closed   uint64 // 1 + the highest quarter stream ID of a closed flow: later datagrams for it are not held
}

// NewH3Datagrams returns the reader of conn's HTTP Datagrams; it starts
// reading at the first Flow (or Start) and stops when conn ends.
func NewH3Datagrams(conn *quic.Conn) *H3Datagrams {
	return &H3Datagrams{conn: conn, flows: map[uint64]*H3DatagramFlow{}}
}

// Unknown is how many datagrams named no registered stream (a closed one, or
// a malformed quarter stream ID): dropped.
func (m *H3Datagrams) Unknown() int64 { return m.unknown.Load() }

// Flow registers the request stream str: its datagrams wait on a queue of up
// to queue datagrams, beyond which they are dropped and counted. Close the
// flow when the request ends.
func (m *H3Datagrams) Flow(str DatagramStream, queue int) *H3DatagramFlow {
	return m.FlowFunc(str, queue, nil)
}

// FlowFunc is Flow that also calls onDrop (if not nil) for each datagram the
// flow's queue drops.
func (m *H3Datagrams) FlowFunc(str DatagramStream, queue int, onDrop func()) *H3DatagramFlow {
	ctx, cancel := context.WithCancelCause(m.conn.Context())
	f := &H3DatagramFlow{m: m, str: str, qsid: uint64(str.StreamID()) / 4, q: make(chan []byte, queue), ctx: ctx, cancel: cancel, onDrop: onDrop}
	m.mu.Lock()
	m.flows[f.qsid] = f
	early := m.pending[f.qsid]
	if early != nil {
		delete(m.pending, f.qsid)
		m.npending -= len(early)
	}
	start := !m.started
	m.started = true
	m.mu.Unlock()
	for _, p := range early {
		f.enqueue(p)
	}
	if start {
		go m.read()
	}
	// What http3's own reader took for this stream.
	go func() {
		for {
			p, err := str.ReceiveDatagram(ctx)
			if err != nil {
				cancel(err)
				return
			}
			f.enqueue(p)
		}
	}()
	return f
}

// Start starts reading before the first flow, so that quic-go's queue of 128
// per connection is drained from the start (a server's datagrams may come
// before their request's handler registered its flow).
func (m *H3Datagrams) Start() {
	m.mu.Lock()
	start := !m.started
	m.started = true
	m.mu.Unlock()
	if start {
		go m.read()
	}
}

func (m *H3Datagrams) read() {
	ctx := m.conn.Context()
	for {
		b, err := m.conn.ReceiveDatagram(ctx)
		if err != nil {
			return // the connection ended; its flows end with it
		}
		qsid, n, err := quicvarint.Parse(b)
		m.mu.Lock()
		f := m.flows[qsid]
		if err == nil && f == nil && m.npending < m.early && qsid >= m.closed {
			if m.pending == nil {
				m.pending = map[uint64][][]byte{}
			}
			m.pending[qsid] = append(m.pending[qsid], b[n:])
			m.npending++
			m.mu.Unlock()
			continue
		}
		m.mu.Unlock()
		if err != nil || f == nil {
			m.unknown.Add(1)
			continue
		}
		f.enqueue(b[n:])
	}
}

// DatagramStream is an HTTP/3 request stream with datagrams: the server's
// *http3.Stream and the client's *http3.RequestStream.
type DatagramStream interface {
	StreamID() quic.StreamID
	SendDatagram([]byte) error
	ReceiveDatagram(context.Context) ([]byte, error)
}

var (
	_ DatagramStream = (*http3.Stream)(nil)
	_ DatagramStream = (*http3.RequestStream)(nil)
)

// H3DatagramFlow is one request stream's HTTP Datagrams.
type H3DatagramFlow struct {
	m       *H3Datagrams
	str     DatagramStream
	qsid    uint64
	q       chan []byte
	ctx     context.Context
	cancel  context.CancelCauseFunc
	dropped atomic.Int64
	onDrop  func()
}

// errFlowClosed ends ReceiveDatagram after Close.
var errFlowClosed = errors.New("the HTTP datagram flow was closed")

func (f *H3DatagramFlow) enqueue(p []byte) {
	select {
	case f.q <- p:
	default:
		f.dropped.Add(1)
		if f.onDrop != nil {
			f.onDrop()
		}
	}
}

// ReceiveDatagram returns the next datagram payload (after the quarter stream
// ID), or the error that ended the stream or the connection.
func (f *H3DatagramFlow) ReceiveDatagram(ctx context.Context) ([]byte, error) {
	select {
	case p := <-f.q:
		return p, nil
	default:
	}
	select {
	case p := <-f.q:
		return p, nil
	case <-f.ctx.Done():
		return nil, context.Cause(f.ctx)
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// TryReceiveDatagram returns the next queued datagram payload without
// waiting, and false when none is queued.
func (f *H3DatagramFlow) TryReceiveDatagram() ([]byte, bool) {
	select {
	case p := <-f.q:
		return p, true
	default:
		return nil, false
	}
}

// SendDatagram sends p on the stream (quic-go blocks while its send queue
// of 32 is full: nothing is dropped on the way out).
func (f *H3DatagramFlow) SendDatagram(p []byte) error { return f.str.SendDatagram(p) }

// AppendQuarterStreamID appends the flow's quarter stream ID, which starts
// each of its datagrams (RFC 9297 §2.1), to b.
func (f *H3DatagramFlow) AppendQuarterStreamID(b []byte) []byte { return quicvarint.Append(b, f.qsid) }

// SendQUIC sends b, the flow's quarter stream ID (AppendQuarterStreamID)
// followed by the payload, as one QUIC DATAGRAM frame below http3, whose
// SendDatagram allocates and copies every datagram to put the ID in front.
// A sender that keeps the ID in its own buffer sends without an allocation
// of its own (quic-go still copies each into its frame).
func (f *H3DatagramFlow) SendQUIC(b []byte) error {
	if err := context.Cause(f.ctx); err != nil {
		return err
	}
	return f.m.conn.SendDatagram(b)
}

// Dropped is how many datagrams found the flow's queue full.
func (f *H3DatagramFlow) Dropped() int64 { return f.dropped.Load() }

// Close unregisters the flow; later datagrams for it are dropped.
func (f *H3DatagramFlow) Close() {
	f.m.mu.Lock()
	if f.m.flows[f.qsid] == f {
		delete(f.m.flows, f.qsid)
	}
	f.m.closed = max(f.m.closed, f.qsid+1)
	f.m.mu.Unlock()
	f.cancel(errFlowClosed)
}

// IPDatagramQueue is the receive queue of one CONNECT-IP tunnel on HTTP/3, in
// packets: 2048 of up to 1280 bytes (2.6 MB at most, 48 KiB when empty) holds
// a burst of a congestion window many times the one the loopback benchmark
// reaches, while quic-go's own queue holds 128 for the whole connection.
const IPDatagramQueue = 2048
