package clients

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

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// whyTimeout bounds asking the server how a session was cut off.
const whyTimeout = 3 * time.Second

// tunnel is a connection through TP to a destination. A failure of it (a reset, a
// QUIC stream reset, a TLS session that ended without close_notify) is returned
// as a *CutError, which can ask the server who cut the session and why
// (CutError.Explain): a cut is never reported as an ordinary end.
type tunnel struct {
	wire.Stream
	d       *Dialer
	session string
}

// Unwrap is the stream the tunnel runs on.
func (t *tunnel) Unwrap() net.Conn { return t.Stream }

// ReadsThrough says that Read passes the stream's bytes, deadline errors and
// deadlines through (wire.ReadThrough): Bridge may wait on it in a one-byte read.
func (t *tunnel) ReadsThrough() {}

var _ wire.ReadThrough = (*tunnel)(nil)

func (t *tunnel) Read(p []byte) (int, error) {
	n, err := t.Stream.Read(p)
	switch {
	case err == nil, errors.Is(err, os.ErrDeadlineExceeded): // a deadline of the caller's own is no cut
	case errors.Is(err, io.EOF):
		if wire.Truncated(t.Stream) {
			err = &CutError{Err: wire.ErrTruncated, t: t}
		}
	case !wire.IsNormalEnd(err):
		err = &CutError{Err: err, t: t}
	}
	return n, err
}

func (t *tunnel) Write(p []byte) (int, error) {
	n, err := t.Stream.Write(p)
	if err != nil && !wire.IsNormalEnd(err) && !errors.Is(err, os.ErrDeadlineExceeded) {
		err = &CutError{Err: err, t: t}
	}
	return n, err
}

// CutError is a session through TP that was cut off before its end. Its text says
// what the client saw; after Explain it says who cut the session and why, as the
// server answered.
type CutError struct {
	Err error            // what the client saw: a reset, a truncated TLS session
	End *wire.SessionEnd // the server's answer to "why", once Explain got one
	why error            // why Explain got no answer
	t   *tunnel
}

func (e *CutError) Unwrap() error { return e.Err }

// dialer is the Dialer of the cut session, or nil.
func (e *CutError) dialer() *Dialer {
	if e.t == nil {
		return nil
	}
	return e.t.d
}

func (e *CutError) Error() string {
	if e.End != nil {
		who := "the TP server"
		switch e.End.By {
		case "destination":
			who = "the destination"
		case "agent":
			who = "the exposed service's side"
		case "client":
			who = "this client's side (as the TP server saw it)"
		}
		return fmt.Sprintf("the session was cut off by %s (%s): %s", who, e.End.Code, e.End.Reason)
	}
	code, coded := cutCode(e.Err)
	if !coded && errors.Is(e.why, syscall.ECONNREFUSED) {
		// A cut without a code (a TCP reset), and the server's listener is
		// closed: a stopping server refuses new connections at once
		// (docs/PROTOCOL.md, section 6.3).
		return "the session through TP was cut off before its end (" + wire.UnwrapOpError(e.Err).Error() +
			"), and the TP server no longer accepts connections: it is most likely shutting down or restarting; reconnect once it is back"
	}
	msg := "the session through TP was cut off before its end: " + transport.ExplainQUIC(e.Err, e.dialer().expiredAdvice).Error()
	if coded {
		msg = fmt.Sprintf("the session was cut off by the TP server (%s): %s", wire.EndName(code), resetText(code, e.dialer()))
	}
	if e.why != nil {
		msg += " (asking the TP server why failed: " + e.why.Error() + ")"
	}
	return msg
}

// cutCode is the code a cut carried: a stream's reset code (a QUIC
// RESET_STREAM, a tp-mux/1 ABORT), or the code of a QUIC connection the server
// closed because it shuts down or the certificate expired.
func cutCode(err error) (quic.ApplicationErrorCode, bool) {
	if code, ok := wire.StreamResetCode(err); ok {
		return code, true
	}
	var ae *quic.ApplicationError
	if errors.As(err, &ae) && ae.Remote && (ae.ErrorCode == wire.QUICShutdown || ae.ErrorCode == wire.QUICCertExpired) {
		return ae.ErrorCode, true
	}
	return 0, false
}

// resetText says what a cut's code means, for people; d, when not nil, is
// the Dialer of the session, which names this device (user@device) and knows
// whether its certificate can be renewed.
func resetText(code quic.ApplicationErrorCode, d *Dialer) string {
	switch wire.EndName(code) {
	case wire.EndShutdown:
		return "the TP server is shutting down; reconnect"
	case wire.EndCertExpired:
		return "the client certificate expired; " + d.expiredAdvice()
	case wire.EndRevoked:
		this := "this device"
		if d != nil && d.device != "" {
			this += " (" + d.device + ")"
		}
		return this + ", its user or its certificate was revoked on the TP server; ask your TP administrator"
	case wire.EndPolicyChanged:
		return "the policy no longer allows this session"
	case wire.EndPeerReset:
		return "the other end (the destination, or the exposed service's agent) reset the connection"
	}
	return "the TP server failed"
}

// Explain asks the server who cut the session and why (op "why", bounded by
// whyTimeout), once; Error then says so. A cut whose code says it all is not
// asked about: a server that shuts down takes no new connection, and a revoked
// device can no longer ask (docs/PROTOCOL.md, section 6.2).
func (e *CutError) Explain(ctx context.Context) {
	if ma := (*muxAbortError)(nil); e.End == nil && errors.As(e.Err, &ma) {
		e.End = &ma.end // a carrier's stream: the agent said why
	}
	if e.End != nil || e.why != nil {
		return
	}
	d := e.dialer()
	code, coded := cutCode(e.Err)
	if coded && (code == wire.QUICShutdown || code == wire.QUICRevoked) {
		e.End = codeEnd(code, d)
		return
	}
	if d == nil || e.t.session == "" {
		return
	}
	wctx, cancel := context.WithTimeout(ctx, whyTimeout)
	e.End, e.why = d.why(wctx, e.t.session)
	cancel()
	if e.End != nil {
		return
	}
	if na, ok := d.certNotAfter(); ok && !time.Now().Before(na) {
		// The server refuses an expired certificate, so it cannot be asked; but
		// then the expiry is the answer.
		e.End = &wire.SessionEnd{Code: wire.EndCertExpired, By: "server",
			Reason: "the client certificate expired at " + na.UTC().Format(time.RFC3339) + "; " + d.expiredAdvice()}
		return
	}
	if coded && code != wire.QUICPeerReset && code != wire.QUICInternal {
		// The server's own reason for the cut is in its code; asking would only
		// have added its words.
		e.End, e.why = codeEnd(code, d), nil
		return
	}
	if errors.Is(e.why, ErrCertificateRejected) && d.whyRejected != nil {
		// The server refused this device's certificate when asked: over TLS,
		// where a cut carries no code, that is how a revocation shows.
		if err := d.whyRejected(ctx, e.why); errors.Is(err, authz.ErrRevoked) {
			e.End, e.why = codeEnd(wire.QUICRevoked, d), nil
		} else if err != nil {
			e.why = err
		}
	}
}

// codeEnd is the end a cut's code stands for, when the server was not (or
// could not be) asked.
func codeEnd(code quic.ApplicationErrorCode, d *Dialer) *wire.SessionEnd {
	return &wire.SessionEnd{Code: wire.EndName(code), By: "server", Reason: resetText(code, d)}
}

// expiredAdvice says what to do about an expired client certificate: tp
// renews it with the device key, or dlogin gets a new one; a device without
// its key can do neither and must be enrolled again (Client.Dialer sets
// renewable). d may be nil.
func (d *Dialer) expiredAdvice() string {
	if d != nil && d.renewable != nil {
		if err := d.renewable(); err != nil {
			return err.Error()
		}
	}
	return transport.DefaultExpiredAdvice
}

// certNotAfter is the expiry of the Dialer's fixed client certificate, if it has one.
func (d *Dialer) certNotAfter() (time.Time, bool) {
	if d.TLSConfig == nil || len(d.TLSConfig.Certificates) == 0 || d.TLSConfig.Certificates[0].Leaf == nil {
		return time.Time{}, false
	}
	return d.TLSConfig.Certificates[0].Leaf.NotAfter, true
}

// ExplainCut explains err when it is (or wraps) a *CutError, and returns err.
func ExplainCut(ctx context.Context, err error) error {
	var ce *CutError
	if errors.As(err, &ce) {
		ce.Explain(ctx)
	}
	return err
}

// why asks the server how session was cut off: on the live QUIC connection when
// there is one, else on a live tp-mux connection (a re-check that cuts many
// tunnels then costs no handshake per tunnel), else on a new TLS connection.
func (d *Dialer) why(ctx context.Context, session string) (*wire.SessionEnd, error) {
	hello := wire.ClientHello{V: wire.Version, Op: wire.OpWhy, Session: session}
	tr := d.transport()
	conn := tr.LiveStream(ctx, "asking why")
	if conn == nil && tr.Mode() != TransportQUIC {
		tc, err := tr.ConnectTLS(ctx)
		if err != nil {
			return nil, d.forgetRejected(explainHelloErr(err, d.expiredAdvice))
		}
		conn = tc
	}
	if conn == nil {
		return nil, errors.New("no QUIC connection to the TP server")
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	sh, err := exchange(conn, hello)
	switch {
	case err != nil:
		return nil, d.forgetRejected(explainHelloErr(err, d.expiredAdvice))
	case !sh.OK && sh.Code == wire.CodeUnknownSession:
		return nil, errors.New("it has no record of cutting this session: the network between cut it, or the server restarted")
	case !sh.OK:
		return nil, &RefusedError{Code: sh.Code, Reason: sh.Reason}
	case sh.End == nil:
		return nil, errors.New("its answer said nothing")
	}
	return sh.End, nil
}
