package wire

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"github.com/quic-go/quic-go"
)

// Browsers without WebTransport (docs/PROTOCOL.md 14.4): one WebSocket per
// request, at WebSocketPath with the same credential in its query. Binary
// messages carry the stream's bytes; an empty one ends the sender's
// direction (FIN); a close with WSAbortBase+c aborts with TP's code c.
const (
	WebSocketPath = "/tp/v1/websocket"
	// WSAbortBase + c is the close code of an abort with code c (9.4).
	WSAbortBase = 4000
	// WSMaxMessage bounds a message's payload.
	WSMaxMessage = 64 << 10
)

// WSStream adapts a WebSocket of that mapping to Stream. A deadline that
// passes during a read or write closes the WebSocket (the library's rule),
// so it serves for the hello's deadline and for shutdowns, as on TLS.
type WSStream struct {
	c      *websocket.Conn
	remote string

	rmu      sync.Mutex
	r        io.Reader // the message being read
	rn       int       // its bytes read so far
	rctx     context.Context
	rcancel  context.CancelFunc
	finished bool // the peer's FIN was read

	dmu        sync.Mutex
	rdl, wdl   time.Time
	readCancel context.CancelFunc // of the read in flight

	wmu       sync.Mutex
	closeOnce sync.Once
	closed    atomic.Bool // this end closed or aborted it
}

var _ Stream = (*WSStream)(nil)

// NewWSStream wraps c; remote names the peer.
func NewWSStream(c *websocket.Conn, remote string) *WSStream {
	c.SetReadLimit(WSMaxMessage)
	return &WSStream{c: c, remote: remote}
}

func (s *WSStream) ctx(deadline time.Time) (context.Context, context.CancelFunc) {
	if deadline.IsZero() {
		return context.WithCancel(context.Background())
	}
	return context.WithDeadline(context.Background(), deadline)
}

func (s *WSStream) Read(p []byte) (int, error) {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	for {
		if s.finished {
			return 0, io.EOF
		}
		if s.r == nil {
			// The message's reader reads within ctx: it lives until the
			// message is read whole.
			s.dmu.Lock()
			ctx, cancel := s.ctx(s.rdl)
			s.readCancel = cancel
			s.dmu.Unlock()
			typ, r, err := s.c.Reader(ctx)
			if err != nil {
				return 0, s.translate("read", err, s.endRead(ctx, cancel))
			}
			if typ != websocket.MessageBinary {
				s.endRead(ctx, cancel)
				_ = s.c.Close(websocket.StatusUnsupportedData, "TP's messages are binary")
				return 0, &net.OpError{Op: "read", Net: "websocket", Addr: s.RemoteAddr(), Err: errors.New("a text message where TP's are binary")}
			}
			s.r, s.rn, s.rctx, s.rcancel = r, 0, ctx, cancel
		}
		n, err := s.r.Read(p)
		s.rn += n
		if err != nil {
			expired := s.endRead(s.rctx, s.rcancel)
			s.r = nil
			if !errors.Is(err, io.EOF) {
				return n, s.translate("read", err, expired)
			}
			if s.rn == 0 {
				s.finished = true // an empty message: the peer's FIN
			}
		}
		if n > 0 {
			return n, nil
		}
	}
}

// endRead ends a message's read context and says whether it had expired
// (its deadline passed, or SetReadDeadline cut it).
func (s *WSStream) endRead(ctx context.Context, cancel context.CancelFunc) bool {
	expired := ctx.Err() != nil
	s.dmu.Lock()
	s.readCancel = nil
	s.dmu.Unlock()
	cancel()
	return expired
}

func (s *WSStream) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	written := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), WSMaxMessage)]
		s.dmu.Lock()
		ctx, cancel := s.ctx(s.wdl)
		s.dmu.Unlock()
		err := s.c.Write(ctx, websocket.MessageBinary, chunk)
		expired := ctx.Err() != nil
		cancel()
		if err != nil {
			return written, s.translate("write", err, expired)
		}
		written += len(chunk)
		p = p[len(chunk):]
	}
	return written, nil
}

// CloseWrite sends the empty message that ends this direction.
func (s *WSStream) CloseWrite() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), HelloWriteTimeout)
	defer cancel()
	return s.c.Write(ctx, websocket.MessageBinary, nil)
}

// Close ends the WebSocket normally (1000), after what was written.
func (s *WSStream) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		go func() { _ = s.c.Close(websocket.StatusNormalClosure, "") }()
	})
	return nil
}

// Abort closes the WebSocket with WSAbortBase+code.
func (s *WSStream) Abort(code quic.ApplicationErrorCode) {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		go func() { _ = s.c.Close(websocket.StatusCode(WSAbortBase+int(code)), quicCodeText(uint64(code))) }()
	})
}

func (s *WSStream) LocalAddr() net.Addr  { return wsAddr("tp") }
func (s *WSStream) RemoteAddr() net.Addr { return wsAddr(s.remote) }

// SetDeadline sets both deadlines.
func (s *WSStream) SetDeadline(t time.Time) error {
	_ = s.SetReadDeadline(t)
	return s.SetWriteDeadline(t)
}

// SetReadDeadline bounds the reads from now on; one already in time passes
// ends at once when t has passed.
func (s *WSStream) SetReadDeadline(t time.Time) error {
	s.dmu.Lock()
	defer s.dmu.Unlock()
	s.rdl = t
	if s.readCancel != nil && !t.IsZero() && !time.Now().Before(t) {
		s.readCancel()
	}
	return nil
}

func (s *WSStream) SetWriteDeadline(t time.Time) error {
	s.dmu.Lock()
	s.wdl = t
	s.dmu.Unlock()
	return nil
}

type wsAddr string

func (a wsAddr) Network() string { return "websocket" }
func (a wsAddr) String() string  { return string(a) }

// translate makes err what a TCP connection's would be: a close with an
// abort code reads as a reset carrying it; a normal close after the peer's
// FIN as the end, and before it (or no close at all: a dropped connection)
// as a reset; a passed deadline as os.ErrDeadlineExceeded.
func (s *WSStream) translate(op string, err error, expired bool) error {
	if expired {
		return &net.OpError{Op: op, Net: "websocket", Addr: s.RemoteAddr(), Err: os.ErrDeadlineExceeded}
	}
	if s.closed.Load() {
		return &net.OpError{Op: op, Net: "websocket", Addr: s.RemoteAddr(), Err: net.ErrClosed}
	}
	switch code := websocket.CloseStatus(err); {
	case code == websocket.StatusNormalClosure && op == "read" && s.finished:
		return io.EOF
	case code == websocket.StatusNormalClosure || code == -1:
		return &net.OpError{Op: op, Net: "websocket", Addr: s.RemoteAddr(), Err: fmt.Errorf("the WebSocket ended before its end of stream: %w", syscall.ECONNRESET)}
	case code >= WSAbortBase && code < WSAbortBase+1000:
		errno := syscall.ECONNRESET
		if op == "write" {
			errno = syscall.EPIPE
		}
		return &net.OpError{Op: op, Net: "websocket", Addr: s.RemoteAddr(), Err: &streamResetError{code: uint64(code - WSAbortBase), errno: errno}}
	case code != -1:
		return &net.OpError{Op: op, Net: "websocket", Addr: s.RemoteAddr(), Err: fmt.Errorf("the WebSocket closed with %d: %w", code, syscall.ECONNRESET)}
	}
	return &net.OpError{Op: op, Net: "websocket", Addr: s.RemoteAddr(), Err: err}
}
