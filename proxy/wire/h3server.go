package wire

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"
)

// HTTP/3 stream and frame types and the settings a server reads itself
// (RFC 9114 §6.2, §7.2.4; RFC 9297 §2.1.1).
const (
	h3StreamControl     = 0x00
	h3StreamPush        = 0x01
	h3StreamQPACKEnc    = 0x02
	h3StreamQPACKDec    = 0x03
	h3FrameSettings     = 0x04
	h3SettingDatagram   = 0x33
	h3MaxSettingsLength = 16 << 10
	h3ErrMissingSetting = 0x010a // H3_MISSING_SETTINGS
	h3ErrSettings       = 0x0109 // H3_SETTINGS_ERROR
)

// H3ServerConn is the server's side of an HTTP/3 connection whose client's
// unidirectional streams and HTTP Datagrams are read here, below quic-go's
// http3, while http3 (a RawServerConn) still serves the requests.
//
// Why: quic-go's http3 starts its own reader of the connection's datagrams as
// soon as the client's SETTINGS announce HTTP Datagrams (every CONNECT-IP and
// CONNECT-UDP client's do), and that reader moves each datagram onto a queue
// of 32 per request stream that drops the rest of a burst without a count.
// A bulk TCP upload through CONNECT-IP lost about a third of its packets
// there. With the control stream read here, http3 never sees the client's
// SETTINGS and never starts that reader: Datagrams is the only one.
//
// What http3 would have done with the client's control stream beyond its
// SETTINGS (PRIORITY_UPDATE, GOAWAY) is read and ignored: response priorities
// do not matter to a proxy, and a client that goes away closes its requests.
type H3ServerConn struct {
	conn      *quic.Conn
	Datagrams *H3Datagrams
	settings  chan struct{} // closed once the client's SETTINGS were read
	dgram     atomic.Bool   // the client's SETTINGS_H3_DATAGRAM
	control   atomic.Bool
	once      sync.Once
	requests  sync.Map // quic.StreamID → *quic.Stream: the requests being served (Track)
}

// NewH3ServerConn returns the reader of conn's client streams and datagrams;
// call ServeUniStreams to start it. Datagrams for a request stream that has
// no flow yet are held (up to H3EarlyDatagrams per connection): a client may
// send them right behind its request (RFC 9298 §5).
func NewH3ServerConn(conn *quic.Conn) *H3ServerConn {
	m := NewH3Datagrams(conn)
	m.early = H3EarlyDatagrams
	return &H3ServerConn{conn: conn, Datagrams: m, settings: make(chan struct{})}
}

// H3EarlyDatagrams bounds the datagrams a server connection holds for request
// streams it has no flow for yet; beyond, they are dropped and counted.
const H3EarlyDatagrams = 64

// Track remembers str, a request stream being served, until the returned
// function is called: RequestStream finds it while its handler runs.
func (c *H3ServerConn) Track(str *quic.Stream) (forget func()) {
	c.requests.Store(str.StreamID(), str)
	return func() { c.requests.Delete(str.StreamID()) }
}

// RequestStream returns the QUIC stream under request stream id, or nil
// (also when c is nil).
func (c *H3ServerConn) RequestStream(id quic.StreamID) *quic.Stream {
	if c == nil {
		return nil
	}
	str, _ := c.requests.Load(id)
	s, _ := str.(*quic.Stream)
	return s
}

// DataWriter writes each of its Writes as one HTTP/3 DATA frame in a single
// write to the QUIC stream, its header in front of the payload. http3's own
// Stream.Write writes the frame's header and its payload separately, and
// quic-go then sends the few bytes of the header in a packet of their own, a
// short packet that also ends the batch of full-size packets sent with one
// system call. For a handler that took its stream over (HTTPStreamer) and
// writes large bursts (an IP tunnel's TCP segments).
type DataWriter struct {
	Stream *quic.Stream
	buf    []byte
}

// Write sends b as one DATA frame.
func (w *DataWriter) Write(b []byte) (int, error) {
	w.buf = quicvarint.Append(append(w.buf[:0], 0x00), uint64(len(b))) // DATA (RFC 9114 §7.2.1)
	w.buf = append(w.buf, b...)
	if _, err := w.Stream.Write(w.buf); err != nil {
		return 0, err
	}
	return len(b), nil
}

// SettingsRead is closed once the client's SETTINGS were read.
func (c *H3ServerConn) SettingsRead() <-chan struct{} { return c.settings }

// PeerDatagrams reports whether the client's SETTINGS announce HTTP Datagrams
// (valid once SettingsRead is closed).
func (c *H3ServerConn) PeerDatagrams() bool { return c.dgram.Load() }

// ServeUniStreams takes the client's unidirectional streams until the
// connection ends: the control stream (its SETTINGS read here), QPACK streams
// (read and discarded: quic-go's QPACK uses no dynamic table) and others
// (refused, RFC 9114 §6.2). A client's push stream, a second control stream,
// a control stream that does not start with SETTINGS or that ends close the
// connection with the error RFC 9114 names.
func (c *H3ServerConn) ServeUniStreams() {
	for {
		str, err := c.conn.AcceptUniStream(c.conn.Context())
		if err != nil {
			return
		}
		str.ReleaseStreamCredit()
		go c.uniStream(str)
	}
}

func (c *H3ServerConn) uniStream(str *quic.ReceiveStream) {
	typ, err := quicvarint.Read(quicvarint.NewReader(str))
	switch {
	case err != nil:
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeStreamCreationError))
	case typ == h3StreamQPACKEnc || typ == h3StreamQPACKDec:
		_, _ = io.Copy(io.Discard, str)
	case typ == h3StreamPush:
		_ = c.conn.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeStreamCreationError), "a client cannot push")
	case typ != h3StreamControl:
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeStreamCreationError))
	case !c.control.CompareAndSwap(false, true):
		_ = c.conn.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeStreamCreationError), "duplicate control stream")
	default:
		dgram, err := ReadH3Settings(str)
		if err != nil {
			code := quic.ApplicationErrorCode(h3ErrMissingSetting)
			if !errors.Is(err, errNotSettings) {
				code = quic.ApplicationErrorCode(http3.ErrCodeFrameError)
			}
			_ = c.conn.CloseWithError(code, err.Error())
			return
		}
		if dgram && !c.conn.ConnectionState().SupportsDatagrams.Remote {
			_ = c.conn.CloseWithError(quic.ApplicationErrorCode(h3ErrSettings), "missing QUIC Datagram support")
			return
		}
		c.dgram.Store(dgram)
		c.once.Do(func() { close(c.settings) })
		_, _ = io.Copy(io.Discard, str)
		_ = c.conn.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeClosedCriticalStream), "control stream closed")
	}
}

// errNotSettings: a control stream's first frame is not SETTINGS.
var errNotSettings = errors.New("the HTTP/3 control stream does not start with SETTINGS")

// ReadH3Settings reads the first frame of an HTTP/3 control stream (after its
// type), which must be SETTINGS, and reports whether it enables HTTP
// Datagrams (SETTINGS_H3_DATAGRAM = 1).
func ReadH3Settings(r io.Reader) (datagrams bool, _ error) {
	br := quicvarint.NewReader(r)
	typ, err := quicvarint.Read(br)
	if err != nil {
		return false, fmt.Errorf("reading the HTTP/3 SETTINGS: %w", err)
	}
	if typ != h3FrameSettings {
		return false, errNotSettings
	}
	n, err := quicvarint.Read(br)
	if err != nil {
		return false, fmt.Errorf("reading the HTTP/3 SETTINGS: %w", err)
	}
	if n > h3MaxSettingsLength {
		return false, fmt.Errorf("the HTTP/3 SETTINGS frame is %d bytes, more than %d", n, h3MaxSettingsLength)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return false, fmt.Errorf("reading the HTTP/3 SETTINGS: %w", err)
	}
	for len(b) > 0 {
		id, k, err := quicvarint.Parse(b)
		if err != nil {
			return false, errors.New("the HTTP/3 SETTINGS frame is malformed")
		}
		b = b[k:]
		v, k, err := quicvarint.Parse(b)
		if err != nil {
			return false, errors.New("the HTTP/3 SETTINGS frame is malformed")
		}
		b = b[k:]
		if id == h3SettingDatagram {
			datagrams = v == 1
		}
	}
	return datagrams, nil
}

type h3ServerConnKey struct{}

// WithH3ServerConn returns ctx carrying c, for the requests of its connection.
func WithH3ServerConn(ctx context.Context, c *H3ServerConn) context.Context {
	return context.WithValue(ctx, h3ServerConnKey{}, c)
}

// H3ServerConnFrom returns the H3ServerConn of a request's connection, or nil
// when http3 reads that connection's datagrams itself.
func H3ServerConnFrom(ctx context.Context) *H3ServerConn {
	c, _ := ctx.Value(h3ServerConnKey{}).(*H3ServerConn)
	return c
}
