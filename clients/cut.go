package clients

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/quic-go/quic-go"

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
	msg := "the session through TP was cut off before its end: " + explainQUICErr(e.Err).Error()
	if code, ok := wire.StreamResetCode(e.Err); ok {
		msg = fmt.Sprintf("the session was cut off by the TP server (%s): %s", wire.EndName(code), resetText(code))
	}
	if e.why != nil {
		msg += " (the server could not say more: " + e.why.Error() + ")"
	}
	return msg
}

// resetText says what a stream reset code means, for people.
func resetText(code quic.ApplicationErrorCode) string {
	switch wire.EndName(code) {
	case wire.EndShutdown:
		return "the TP server is shutting down; reconnect"
	case wire.EndCertExpired:
		return "the client certificate expired; tp renews it on the next connection, or run dlogin"
	case wire.EndRevoked:
		return "this device, its user or its certificate was revoked"
	case wire.EndPolicyChanged:
		return "the policy no longer allows this session"
	case wire.EndPeerReset:
		return "the other end (the destination, or the exposed service's agent) reset the connection"
	}
	return "the TP server failed"
}

// Explain asks the server who cut the session and why (op "why", bounded by
// whyTimeout), once; Error then says so.
func (e *CutError) Explain(ctx context.Context) {
	if ma := (*muxAbortError)(nil); e.End == nil && errors.As(e.Err, &ma) {
		e.End = &ma.end // a carrier's stream: the agent said why
	}
	if e.End != nil || e.why != nil || e.t == nil || e.t.session == "" {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, whyTimeout)
	defer cancel()
	e.End, e.why = e.t.d.why(ctx, e.t.session)
	if e.End == nil {
		// The server refuses an expired certificate, so it cannot be asked; but
		// then the expiry is the answer.
		if na, ok := e.t.d.certNotAfter(); ok && !time.Now().Before(na) {
			e.End = &wire.SessionEnd{Code: wire.EndCertExpired, By: "server",
				Reason: "the client certificate expired at " + na.UTC().Format(time.RFC3339) + "; tp renews it on the next connection, or run dlogin"}
		}
	}
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
	var conn wire.Stream
	if d.liveQUIC() != nil {
		if _, st, err := d.openStream(ctx, "asking why"); err == nil {
			conn = st
		}
	}
	if m := d.tlsMux.usable(); conn == nil && m != nil {
		if st, err := m.Open(nil); err == nil {
			conn = st
		}
	}
	if conn == nil && d.mode() != TransportQUIC {
		tc, err := d.connectTLS(ctx)
		if err != nil {
			return nil, err
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
		return nil, err
	case !sh.OK && sh.Code == wire.CodeUnknownSession:
		return nil, errors.New("it has no record of cutting this session: the network between cut it, or the server restarted")
	case !sh.OK:
		return nil, &RefusedError{Code: sh.Code, Reason: sh.Reason}
	case sh.End == nil:
		return nil, errors.New("its answer said nothing")
	}
	return sh.End, nil
}
