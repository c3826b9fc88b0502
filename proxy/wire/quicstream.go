package wire

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
)

// QUIC application error codes. They travel in RESET_STREAM and STOP_SENDING
// (stream codes) and in CONNECTION_CLOSE (connection codes); docs/PROTOCOL.md lists them.
const (
	// QUICNoError closes a stream or connection normally.
	QUICNoError quic.ApplicationErrorCode = 0x0
	// QUICInternal: the sender failed, or found a protocol violation on the
	// stream (ProtocolError).
	QUICInternal quic.ApplicationErrorCode = 0x1
	// QUICRefused: a stream or connection refused because the server is at its
	// bound of concurrent requests (max-conns) or is shutting down.
	QUICRefused quic.ApplicationErrorCode = 0x2
	// QUICShutdown closes a connection because the server is shutting down.
	QUICShutdown quic.ApplicationErrorCode = 0x3
	// QUICCertExpired closes a connection when the client certificate that
	// authenticated it expires.
	QUICCertExpired quic.ApplicationErrorCode = 0x4
)

// quicCodeText says what an application error code means, for people.
func quicCodeText(code uint64) string {
	switch quic.ApplicationErrorCode(code) {
	case QUICNoError:
		return "closed"
	case QUICInternal:
		return "internal error"
	case QUICRefused:
		return "refused: the server is busy or shutting down"
	case QUICShutdown:
		return "the server is shutting down"
	case QUICCertExpired:
		return "the client certificate expired"
	case QUICRevoked:
		return "the device, its user or its certificate was revoked"
	case QUICPolicyChanged:
		return "the policy no longer allows the session"
	case QUICPeerReset:
		return "the other end of the session reset it or failed"
	default:
		return fmt.Sprintf("error code %#x", code)
	}
}

// QUICStream adapts a bidirectional QUIC stream to Stream (net.Conn plus
// CloseWrite), so the proxy session, Bridge and client code do not care which
// transport carried a request. Errors are translated to what a TCP connection
// would return: a reset by the peer wraps ECONNRESET (read) or EPIPE (write), use
// after a local close wraps net.ErrClosed, and a dead connection becomes a
// *QUICConnError, which is deliberately not a "normal end" for IsNormalEnd.
type QUICStream struct {
	conn    *quic.Conn
	str     *quic.Stream
	readEnd func() // OnReadEnd
	wt      bool   // a WebTransport stream's (WTStream): codes in its space
}

var _ Stream = (*QUICStream)(nil)

// NewQUICStream wraps str, a stream of conn.
func NewQUICStream(conn *quic.Conn, str *quic.Stream) *QUICStream {
	return &QUICStream{conn: conn, str: str}
}

// OnReadEnd sets f, which ReadEnded calls: a server counts the streams whose
// client direction it has not yet read to its end (op "bye"). Set it before
// the stream is used.
func (s *QUICStream) OnReadEnd(f func()) { s.readEnd = f }

// ReadEnded says that the peer's direction was read to its end (FIN) and that
// end passed on; Bridge calls it (ReadEnder).
func (s *QUICStream) ReadEnded() {
	if s.readEnd != nil {
		s.readEnd()
	}
}

// Context ends when the peer stops the stream (STOP_SENDING) or the
// connection ends; its cause says which (quic-go's). This end's own close or
// reset ends it too: PeerCancelled tells them apart.
func (s *QUICStream) Context() context.Context { return s.str.Context() }

// PeerCancelled reports whether cause, the cause of a stream's Context (a QUIC
// stream's or another multiplexer's), means the peer cancelled the stream or
// its connection ended, not that this end closed or reset it.
func PeerCancelled(cause error) bool {
	var se *quic.StreamError
	switch {
	case cause == nil, errors.Is(cause, quic.ErrStreamClosed):
		return false
	case errors.As(cause, &se):
		return se.Remote
	}
	return true
}

// Conn is the QUIC connection the stream belongs to.
func (s *QUICStream) Conn() *quic.Conn { return s.conn }

func (s *QUICStream) Read(p []byte) (int, error) {
	n, err := s.str.Read(p)
	if err != nil {
		err = s.translate("read", err)
	}
	return n, err
}

func (s *QUICStream) Write(p []byte) (int, error) {
	n, err := s.str.Write(p)
	if err != nil {
		err = s.translate("write", err)
	}
	return n, err
}

// CloseWrite sends FIN: the peer reads EOF after the data written so far.
func (s *QUICStream) CloseWrite() error { return s.str.Close() }

// Close ends both directions: it stops receiving (STOP_SENDING with QUICNoError,
// which also unblocks a pending Read) and sends FIN after the data already
// written, so nothing written before Close is lost.
func (s *QUICStream) Close() error {
	s.str.CancelRead(quic.StreamErrorCode(QUICNoError))
	if err := s.str.Close(); err != nil {
		s.str.CancelWrite(quic.StreamErrorCode(QUICNoError))
	}
	return nil
}

// Abort resets both directions with code: the peer's reads and writes fail.
func (s *QUICStream) Abort(code quic.ApplicationErrorCode) {
	s.str.CancelRead(quic.StreamErrorCode(code))
	s.str.CancelWrite(quic.StreamErrorCode(code))
}

func (s *QUICStream) LocalAddr() net.Addr                { return s.conn.LocalAddr() }
func (s *QUICStream) RemoteAddr() net.Addr               { return s.conn.RemoteAddr() }
func (s *QUICStream) SetDeadline(t time.Time) error      { return s.str.SetDeadline(t) }
func (s *QUICStream) SetReadDeadline(t time.Time) error  { return s.str.SetReadDeadline(t) }
func (s *QUICStream) SetWriteDeadline(t time.Time) error { return s.str.SetWriteDeadline(t) }

// QUICConnError reports that the QUIC connection carrying a stream ended while the
// stream was in use: the peer closed it with an error, it timed out, or the peer
// forgot it (stateless reset, e.g. after a restart).
type QUICConnError struct {
	Err error // the quic-go error
}

func (e *QUICConnError) Error() string {
	var ae *quic.ApplicationError
	var te *quic.TransportError
	var ie *quic.IdleTimeoutError
	var sr *quic.StatelessResetError
	switch {
	case errors.As(e.Err, &ae) && ae.Remote:
		msg := quicCodeText(uint64(ae.ErrorCode))
		if ae.ErrorMessage != "" && ae.ErrorMessage != msg {
			msg += " (" + ae.ErrorMessage + ")"
		}
		return "the peer closed the QUIC connection: " + msg
	case errors.As(e.Err, &te) && te.ErrorCode.IsCryptoError():
		return "the QUIC connection's TLS handshake failed: " + te.ErrorCode.Message()
	case errors.As(e.Err, &ie):
		return "the QUIC connection timed out: no packets from the peer (network down, or the peer is gone)"
	case errors.As(e.Err, &sr):
		return "the peer no longer knows this QUIC connection (stateless reset; it probably restarted)"
	default:
		return "the QUIC connection failed: " + e.Err.Error()
	}
}

func (e *QUICConnError) Unwrap() error { return unwrapHidden{e.Err} }

// unwrapHidden keeps errors.As access to quic-go's error types but hides the
// net.ErrClosed they unwrap to, which would make a dead connection look like an
// ordinary local close.
type unwrapHidden struct{ err error }

func (u unwrapHidden) Error() string { return u.err.Error() }

func (u unwrapHidden) As(target any) bool {
	switch t := target.(type) {
	case **quic.ApplicationError:
		v, ok := u.err.(*quic.ApplicationError)
		if ok {
			*t = v
		}
		return ok
	case **quic.TransportError:
		v, ok := u.err.(*quic.TransportError)
		if ok {
			*t = v
		}
		return ok
	case **quic.IdleTimeoutError:
		v, ok := u.err.(*quic.IdleTimeoutError)
		if ok {
			*t = v
		}
		return ok
	case **quic.StatelessResetError:
		v, ok := u.err.(*quic.StatelessResetError)
		if ok {
			*t = v
		}
		return ok
	}
	return false
}

// streamResetError is a stream cancelled by the peer.
type streamResetError struct {
	code  uint64
	errno syscall.Errno
}

func (e *streamResetError) Error() string {
	return "stream reset by the peer: " + quicCodeText(e.code)
}

func (e *streamResetError) Unwrap() error { return e.errno }

// ResetError is a stream the peer cut with code (section 6.1): what a QUIC
// stream reset reads as, for a stream of another multiplexer that carries the
// code too (tp-mux/1's ABORT). StreamResetCode finds code in it.
func ResetError(code quic.ApplicationErrorCode) error {
	return &streamResetError{code: uint64(code), errno: syscall.ECONNRESET}
}

// StreamResetCode reports the application error code when err is a QUIC stream
// reset by the peer (or a ResetError).
func StreamResetCode(err error) (quic.ApplicationErrorCode, bool) {
	var re *streamResetError
	if errors.As(err, &re) {
		return quic.ApplicationErrorCode(re.code), true
	}
	return 0, false
}

func (s *QUICStream) translate(op string, err error) error {
	var se *quic.StreamError
	var ae *quic.ApplicationError
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, os.ErrDeadlineExceeded):
		return err // io.EOF and deadline errors pass unchanged: callers test for them
	case errors.As(err, &se):
		if !se.Remote {
			return &net.OpError{Op: op, Net: "quic", Source: s.LocalAddr(), Addr: s.RemoteAddr(), Err: net.ErrClosed}
		}
		errno := syscall.ECONNRESET
		if op == "write" {
			errno = syscall.EPIPE
		}
		code := uint64(se.ErrorCode)
		if c, ok := WTCodeOf(se.ErrorCode); ok && s.wt {
			code = uint64(c)
		}
		return &net.OpError{Op: op, Net: "quic", Source: s.LocalAddr(), Addr: s.RemoteAddr(), Err: &streamResetError{code: code, errno: errno}}
	case errors.Is(err, quic.ErrStreamClosed):
		return &net.OpError{Op: op, Net: "quic", Source: s.LocalAddr(), Addr: s.RemoteAddr(), Err: net.ErrClosed}
	case errors.As(err, &ae) && (!ae.Remote || ae.ErrorCode == QUICNoError):
		return err // closed locally or normally by the peer: an ordinary end
	}
	var te *quic.TransportError
	if errors.As(err, &te) && !te.Remote && !te.ErrorCode.IsCryptoError() && te.ErrorCode == quic.NoError {
		return err
	}
	return &net.OpError{Op: op, Net: "quic", Source: s.LocalAddr(), Addr: s.RemoteAddr(), Err: &QUICConnError{Err: err}}
}

// QUIC receive windows. quic-go's defaults (512 KiB initial, 6/15 MiB max) cap one
// stream at roughly 100 MB/s on loopback; the larger maximums were the only setting
// that raised throughput reproducibly (see the README's figures). A stream's window
// starts small and grows (quic-go's auto-tuning) only while its reader keeps up, so
// a session whose destination stops reading holds what its window had reached, not
// 16 MiB from its first byte; and the connection's window starts at 32 of those, so
// that one stalled stream cannot take the whole connection's credit and stop the
// other tunnels sharing it. A peer cannot have more than MaxConnectionReceiveWindow
// unread per connection.
const (
	QUICInitialStreamWindow = 512 << 10
	QUICMaxStreamWindow     = 64 << 20
	QUICInitialConnWindow   = 16 << 20
	QUICMaxConnWindow       = 64 << 20
)
