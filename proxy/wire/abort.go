package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"github.com/quic-go/quic-go"
)

// A session that ends before both ends finished it is aborted, never closed: the
// peers see a TCP reset, a TLS connection closed without close_notify, or a QUIC
// stream reset carrying one of these codes (docs/PROTOCOL.md, section 6.1), so a
// cut can never pass for a complete transfer.
const (
	// QUICRevoked: the session's device, user or certificate was revoked.
	QUICRevoked quic.ApplicationErrorCode = 0x5
	// QUICPolicyChanged: the policy (or the identity's groups) no longer allows
	// the session.
	QUICPolicyChanged quic.ApplicationErrorCode = 0x6
	// QUICPeerReset: the other end of the session (the destination, the agent or
	// the dialing client) ended its side with an error or a reset.
	QUICPeerReset quic.ApplicationErrorCode = 0x7
)

// End codes name the abort codes in a "why" answer (SessionEnd.Code).
const (
	EndShutdown      = "shutdown"
	EndCertExpired   = "cert_expired"
	EndRevoked       = "revoked"
	EndPolicyChanged = "policy_changed"
	EndPeerReset     = "peer_reset"
	EndInternal      = "internal"
)

// endNames maps abort codes to their names.
var endNames = map[quic.ApplicationErrorCode]string{
	QUICInternal:      EndInternal,
	QUICShutdown:      EndShutdown,
	QUICCertExpired:   EndCertExpired,
	QUICRevoked:       EndRevoked,
	QUICPolicyChanged: EndPolicyChanged,
	QUICPeerReset:     EndPeerReset,
}

// EndName is the name of an abort code ("internal" for codes it does not know).
func EndName(code quic.ApplicationErrorCode) string {
	if n, ok := endNames[code]; ok {
		return n
	}
	return EndInternal
}

// SessionEnd says how a session was aborted: what the server answers to op "why".
type SessionEnd struct {
	// Code is one of the End* names.
	Code string `json:"code"`
	// By says who cut the session: "server" (TP ended it), "destination",
	// "agent" (the exposed service's side) or "client" (the dialer's side).
	By string `json:"by"`
	// Reason is a sentence for people.
	Reason string `json:"reason"`
}

// EndError is the cause of a session that the server aborts: it carries the code
// sent on QUIC streams and the answer to "why".
type EndError struct {
	Code   quic.ApplicationErrorCode
	By     string
	Reason string
}

func (e *EndError) Error() string { return e.Reason }

// End is e as a SessionEnd.
func (e *EndError) End() SessionEnd {
	return SessionEnd{Code: EndName(e.Code), By: e.By, Reason: e.Reason}
}

// Ends the server gives for sessions it aborts itself.
var (
	// ErrShutdown ends sessions cut by a server that is stopping.
	ErrShutdown = &EndError{Code: QUICShutdown, By: "server", Reason: "the TP server is shutting down"}
	// ErrClientGone ends sessions whose client's connection (a QUIC connection,
	// a tp-mux connection) ended while they were open: nothing can reach the
	// client any more, and a session whose destination neither reads nor
	// writes would otherwise hold its slot and buffers until the destination
	// moves.
	ErrClientGone = &EndError{Code: QUICPeerReset, By: "client", Reason: "the client's connection to the TP server ended while the session was open"}
	// ErrCertExpired ends sessions whose client certificate expired.
	ErrCertExpired = &EndError{Code: QUICCertExpired, By: "server", Reason: "the client certificate that authorised the session expired; tp renews it on the next connection, or run dlogin"}
)

// ProtocolError is a violation of the protocol that the peer committed on a
// stream after the hellos (docs/PROTOCOL.md, section 9.5): a malformed capsule or
// REPORT, a flow id that is not the stream's. The receiver aborts that stream
// with QUICInternal and leaves the connection and its other streams alone.
type ProtocolError struct{ Err error }

func (e *ProtocolError) Error() string { return "protocol error: " + e.Err.Error() }

func (e *ProtocolError) Unwrap() error { return e.Err }

// AbortCode is the code an abort caused by err carries: the EndError's, internal
// for a protocol error, shutdown for a cancelled context (the process is
// stopping), peer_reset otherwise.
func AbortCode(err error) quic.ApplicationErrorCode {
	var ee *EndError
	var re *RevokedError
	var pe *ProtocolError
	switch {
	case errors.As(err, &ee):
		return ee.Code
	case errors.As(err, &pe):
		return QUICInternal
	case errors.As(err, &re):
		return re.Code()
	case errors.Is(err, context.Canceled):
		return QUICShutdown
	}
	return QUICPeerReset
}

// Abort ends c so that its peer sees a failure, not a clean end: a TCP reset
// (linger 0) for TCP and TLS-over-TCP connections (no close_notify is sent), a
// RESET_STREAM and STOP_SENDING with code for QUIC streams. It finds what to reset
// by unwrapping c (TLS connections, Unwrap() net.Conn), resets that first, so
// that no wrapper can still send a clean end, and then closes c.
func Abort(c net.Conn, code quic.ApplicationErrorCode) {
	for below := c; below != nil; below = unwrapConn(below) {
		if tc, ok := below.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
			_ = tc.Close()
			break
		}
		if a, ok := below.(aborter); ok {
			a.Abort(code)
			break
		}
	}
	_ = c.Close()
}

// aborter is a stream that can be reset with a code (*QUICStream).
type aborter interface {
	Abort(quic.ApplicationErrorCode)
}

// HalfCloseTransport sends the FIN of the TCP connection c runs on (c
// itself, a TLS connection's transport, or what a wrapper holds: Unwrap()
// net.Conn), when it finds one. It sends no close_notify: that is the TLS
// connection's CloseWrite.
func HalfCloseTransport(c net.Conn) error {
	for below := c; below != nil; below = unwrapConn(below) {
		if tc, ok := below.(*net.TCPConn); ok {
			return tc.CloseWrite()
		}
	}
	return nil
}

// unwrapConn returns the connection c runs on: a TLS connection's transport, or
// what a wrapper holds (Unwrap() net.Conn); nil when there is none.
func unwrapConn(c net.Conn) net.Conn {
	switch v := c.(type) {
	case *tls.Conn:
		return v.NetConn()
	case interface{ Unwrap() net.Conn }:
		return v.Unwrap()
	}
	return nil
}

// transportEOF is implemented by a wrapper under a TLS connection that saw its
// transport end (see EOFConn).
type transportEOF interface{ TransportEOF() bool }

// Truncated reports whether the first TLS connection in c's wrapper chain (c
// itself, a TLS connection's transport, Unwrap() net.Conn) ended without
// close_notify, where an EOFConn under it can tell; see tlsTruncated.
func Truncated(c net.Conn) bool { return tlsTruncated(c) }

// tlsTruncated reports whether the first TLS connection in c's wrapper chain
// ended without close_notify. crypto/tls returns io.EOF for a transport that ends
// at a record boundary as it does for close_notify; after a close_notify it stops
// reading its transport, so an EOF seen below it means that none came.
func tlsTruncated(c net.Conn) bool {
	for c != nil {
		if tc, ok := c.(*tls.Conn); ok {
			for below := tc.NetConn(); below != nil; below = unwrapConn(below) {
				if t, ok := below.(transportEOF); ok {
					return t.TransportEOF()
				}
			}
			return false
		}
		c = unwrapConn(c)
	}
	return false
}

// ErrTruncated is a TLS session that ended without close_notify: its peer went
// away mid-session, and data may be missing.
var ErrTruncated = errors.New("the TLS session ended without close_notify (cut off); data may be missing")

// EOFConn wraps the transport of a TLS connection so that an end of the TLS
// session without close_notify can be told from a clean one (ErrTruncated).
//
// It also gathers records (Batch): crypto/tls writes each record of up to 16
// KiB with a Write of its own, so a multiplexer's batch of frames would cost a
// system call per record.
type EOFConn struct {
	net.Conn
	eof bool
	mu  sync.Mutex

	batching atomic.Int32 // batches open; while > 0, Writes are gathered in buf
	bmu      sync.Mutex   // buf, berr, and Writes while batching
	buf      []byte
	berr     error // the transport's write error, once a flush failed
}

// maxGather is the most Batch holds before it writes.
const maxGather = 256 << 10

func (e *EOFConn) Write(p []byte) (int, error) {
	if e.batching.Load() == 0 {
		return e.Conn.Write(p)
	}
	e.bmu.Lock()
	defer e.bmu.Unlock()
	if e.berr != nil {
		return 0, e.berr
	}
	if e.batching.Load() == 0 { // the batch ended meanwhile (and was flushed)
		return e.Conn.Write(p)
	}
	e.buf = append(e.buf, p...)
	if len(e.buf) >= maxGather {
		return len(p), e.flushLocked()
	}
	return len(p), nil
}

// Batch runs write (one Write of the TLS connection above, which crypto/tls
// cuts into records) and sends the records it made with as few Writes of the
// transport as their size allows. Writes from elsewhere meanwhile (an alert)
// join the batch, in order.
func (e *EOFConn) Batch(write func() error) error {
	e.batching.Add(1)
	err := write()
	e.bmu.Lock()
	defer e.bmu.Unlock()
	// The last batch flushes before it ends: a Write meanwhile still takes the
	// slow path and waits for bmu, so no record overtakes the batch's.
	if e.batching.Load() == 1 {
		if ferr := e.flushLocked(); err == nil {
			err = ferr
		}
	}
	e.batching.Add(-1)
	return err
}

func (e *EOFConn) flushLocked() error {
	if len(e.buf) == 0 || e.berr != nil {
		e.buf = e.buf[:0]
		return e.berr
	}
	_, err := e.Conn.Write(e.buf)
	if cap(e.buf) > maxGather+maxGather/4 {
		e.buf = nil
	} else {
		e.buf = e.buf[:0]
	}
	if err != nil {
		e.berr = err
	}
	return err
}

// NewEOFConn wraps c, the transport a TLS connection will run on.
func NewEOFConn(c net.Conn) *EOFConn { return &EOFConn{Conn: c} }

func (e *EOFConn) Read(p []byte) (int, error) {
	n, err := e.Conn.Read(p)
	// Data with an error (QUIC) may still hold a close_notify; a deadline leaves
	// the TLS connection usable.
	var ne net.Error
	if n == 0 && err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
		e.mu.Lock()
		e.eof = true
		e.mu.Unlock()
	}
	return n, err
}

// TransportEOF reports whether a read of the transport failed or ended.
func (e *EOFConn) TransportEOF() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.eof
}

// CloseWrite half-closes the transport, when it can.
func (e *EOFConn) CloseWrite() error {
	if cw, ok := e.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return errors.New("this connection cannot half-close")
}

// Unwrap is the transport.
func (e *EOFConn) Unwrap() net.Conn { return e.Conn }

// CutError is a session that ended because one of Bridge's two connections
// failed: a reset, a read or write error, or an end without close_notify.
type CutError struct {
	// B is true when the second connection given to Bridge failed, false for the first.
	B   bool
	Err error
}

func (e *CutError) Error() string {
	side := "first"
	if e.B {
		side = "second"
	}
	return fmt.Sprintf("the %s connection failed: %v", side, UnwrapOpError(e.Err))
}

func (e *CutError) Unwrap() error { return e.Err }

// RevokedError ends a live session that a re-check no longer allows. Its text is
// what the session's log line gives as the reason it ended. Identity is true when
// the identity itself is no longer accepted (revoked, unenrolled), false when the
// policy no longer allows the session; Revoked, when it is revoked (not only
// unknown for now), which ends an agent for good.
type RevokedError struct {
	Reason   string
	Identity bool
	Revoked  bool
}

func (e *RevokedError) Error() string { return "no longer authorised: " + e.Reason }

// Code is the QUIC application error code an abort for e carries.
func (e *RevokedError) Code() quic.ApplicationErrorCode {
	if e.Identity {
		return QUICRevoked
	}
	return QUICPolicyChanged
}

// UnwrapOpError drops net.OpError's repetition of the address for a shorter reason.
func UnwrapOpError(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err
	}
	return err
}
