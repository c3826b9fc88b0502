package clients

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A request runs on the stream the transport hands it
// (transport.Client.RoundTrip): the hello exchange (on tp-mux, in the stream's opening),
// early bytes or an end-to-end attach with the hello, and the answer.

// dialTrip is the TCP dial of addr as a request for the transport.
func (d *Dialer) dialTrip(addr string, hello wire.ClientHello, early *earlyDial) transport.Trip {
	return transport.Trip{Kind: transport.TripDial, What: "tp dial " + addr,
		Retry: early,
		Run: func(ctx context.Context, s *transport.Stream) (net.Conn, error) {
			return d.dialRequest(ctx, s, addr, hello, early)
		}}
}

// RetryOnNew says whether a request that failed with err on a spare connection
// goes again on a new one (transport.Retry): when the failure says nothing
// about the request (the server closed the idle connection, or answered
// hello_timeout because it waited longer than its hello timeout). Not after a
// failure without an answer when the dial's first bytes went sealed in an
// attach: the server may have passed them on to the agent before the
// connection failed, and a request must not reach a service twice (as for
// early bytes over QUIC, early.go). early may be nil: a request without first
// bytes.
func (early *earlyDial) RetryOnNew(err error) bool {
	var xe *exchangeError
	var re *RefusedError
	switch {
	case errors.As(err, &re):
		return re.Code == wire.CodeHelloTimeout
	case errors.As(err, &xe):
		return mayResend(err, early)
	}
	return false
}

// Resend is mayResend (transport.Retry); early may be nil.
func (early *earlyDial) Resend(err error) bool { return mayResend(err, early) }

// mayResend says whether a dial that failed with err may go again on another
// connection: not once its first bytes went sealed in an attach (they may have
// reached the service), unless the server answered with a stateless reset (it
// held nothing of the connection, so it saw neither the hello nor the bytes).
func mayResend(err error, early *earlyDial) bool {
	return early == nil || !early.sealed || errors.As(err, new(*quic.StatelessResetError))
}

// dialRequest runs a TCP dial on s: with early's first bytes right behind the
// hello, returning before the answer, when s may take them (mayEarly;
// early.go), else the hello exchange and the answer.
func (d *Dialer) dialRequest(ctx context.Context, s *transport.Stream, addr string, hello wire.ClientHello, early *earlyDial) (net.Conn, error) {
	if early != nil && d.mayEarly(s, addr, early) {
		s.Early = true
		return d.requestEarly(ctx, s, addr, hello, early)
	}
	sh, attach, err := d.helloExchange(ctx, s, addr, hello, early)
	if err != nil {
		return nil, err
	}
	if s.Learn {
		d.earlyState(s.QUIC).answered(s.QUIC, addr, sh)
	}
	return d.answer(ctx, s.Stream, addr, hello, sh, attach)
}

// request runs the hello exchange on s and returns its stream once the server
// said ok (an agent's accept of a session). It closes s on failure.
func (d *Dialer) request(ctx context.Context, s *transport.Stream, addr string, hello wire.ClientHello) (net.Conn, error) {
	sh, attach, err := d.helloExchange(ctx, s, addr, hello, nil)
	if err != nil {
		return nil, err
	}
	return d.answer(ctx, s.Stream, addr, hello, sh, attach)
}

// helloExchange sends hello on s (with an attach to end-to-end state, for a
// protected name: e2eattach.go, carrying early's first bytes when it can) and
// reads the server's answer; on tp-mux the stream is opened with them
// (muxExchange). It closes s on failure.
func (d *Dialer) helloExchange(ctx context.Context, s *transport.Stream, addr string, hello wire.ClientHello, early *earlyDial) (wire.ServerHello, *pendingAttach, error) {
	if s.Mux != nil {
		return d.muxExchange(ctx, s, addr, hello, early)
	}
	conn := s.Stream
	// The hello exchange is bounded by ctx through the connection's deadline.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	var attach *pendingAttach
	if directClaimFrom(ctx) == nil { // a pair's opening replaces the inner session
		attach = d.earlyAttach(conn, hello, early)
	}
	sh, err := exchangeWith(conn, hello, attach.message())
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		_ = conn.Close()
		return sh, nil, &exchangeError{fmt.Errorf("tp dial %s via %s: %w", addr, d.Server, d.forgetRejected(explainHelloErr(err, d.expiredAdvice)))}
	}
	_ = conn.SetDeadline(time.Time{})
	return sh, attach, nil
}

// answer turns the server's answer sh to a request on conn into the connection
// to return: the tunnel after an ok, the refusal otherwise (conn then closed).
// attach is what went with the hello toward a protected name, or nil.
func (d *Dialer) answer(ctx context.Context, conn wire.Stream, addr string, hello wire.ClientHello, sh wire.ServerHello, attach *pendingAttach) (net.Conn, error) {
	if !sh.OK {
		_ = conn.Close()
		return nil, &RefusedError{Code: sh.Code, Reason: sh.Reason}
	}
	var c net.Conn = conn
	var err error
	switch {
	case sh.E2E && directClaimFrom(ctx) != nil: // an end-to-end QUIC pair (direct_dial.go)
		return d.startDirect(ctx, conn, addr, directClaimFrom(ctx))
	case sh.E2E: // a protected reverse listener: TLS with its agent inside (e2e.go)
		if claim := muxClaimFrom(ctx); claim != nil {
			claim.session = sh.Session // a carrier's streams are cut with it (e2emux_dial.go)
		}
		if c, err = d.e2eSession(ctx, conn, addr, attach); err != nil {
			return nil, err
		}
	case attach != nil: // the attach went to a service that is no longer protected
		wire.Abort(conn, wire.QUICInternal)
		d.e2e.drop(hello.Host, attach.st)
		return nil, fmt.Errorf("tp dial %s: the name is no longer protected (its agent now exposes it publicly); dial again", addr)
	}
	if sh.Session != "" { // a dial: its failures say who cut it (cut.go)
		return &tunnel{Stream: c.(wire.Stream), d: d, session: sh.Session}, nil
	}
	return c, nil
}

// exchangeError is a request that failed in its hello exchange with the server,
// before any answer: a spare connection's failure worth one retry (retryOnNew).
type exchangeError struct{ error }

func exchange(conn net.Conn, hello wire.ClientHello) (wire.ServerHello, error) {
	return exchangeWith(conn, hello, nil)
}

// exchangeWith sends then, in the same write as the hello: bytes for after the
// ok that the server keeps for the destination (an early attach).
func exchangeWith(conn net.Conn, hello wire.ClientHello, then []byte) (wire.ServerHello, error) {
	var err error
	if then == nil {
		err = wire.WriteClientHello(conn, hello)
	} else {
		var buf bytes.Buffer
		if err = wire.WriteClientHello(&buf, hello); err == nil {
			_, err = conn.Write(append(buf.Bytes(), then...))
		}
	}
	if err != nil {
		// A server that refused the client's certificate after the client's side
		// of the handshake was done (TLS 1.3 checks it last; on a resumed session
		// it is the server's last step) sent an alert and closed: the write may
		// fail first (EPIPE, ECONNRESET) with the alert still waiting to be read.
		if _, rerr := wire.ReadServerHello(conn); rerr != nil && strings.Contains(rerr.Error(), "remote error: tls:") {
			return wire.ServerHello{}, fmt.Errorf("sending client hello: %w", rerr)
		}
		return wire.ServerHello{}, fmt.Errorf("sending client hello: %w", err)
	}
	sh, err := wire.ReadServerHello(conn)
	switch {
	case errors.Is(err, io.EOF):
		return wire.ServerHello{}, fmt.Errorf("reading server hello: the TP server closed the connection without answering: %w", err)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return wire.ServerHello{}, fmt.Errorf("reading server hello: the TP server's answer was cut short: %w", err)
	case err != nil:
		return wire.ServerHello{}, fmt.Errorf("reading server hello: %w", err)
	}
	return sh, nil
}

// explainHelloErr adds a hint when the server dropped the connection with a TLS
// alert: with TLS 1.3 the client's handshake completes before the server has
// checked the client certificate, so a rejected certificate surfaces here.
func explainHelloErr(err error, expiredAdvice func() string) error {
	if code, reset := wire.StreamResetCode(err); reset && code == wire.QUICPeerReset {
		// The session began and its other end reset it at once (an exposed
		// service's agent that cannot connect to its local service resets a
		// public name's session): the server's reset of this request overtook
		// its ok, which a reset stream drops unread.
		return transport.Explained("the session ended at once, before the TP server's answer arrived: "+resetText(code, nil)+
			"; is the service there running?", err)
	}
	var ce *wire.QUICConnError
	if _, reset := wire.StreamResetCode(err); reset || errors.As(err, &ce) {
		return transport.ExplainQUIC(err, expiredAdvice)
	}
	if strings.Contains(err.Error(), "remote error: tls:") {
		return &transport.RejectedError{Err: err}
	}
	return err
}

// muxExchange is helloExchange on a tp-mux connection: it opens the stream
// with the hello (and an end-to-end attach, when one goes with it) and reads
// the server's answer. The stream is refused (s.Refused) when it failed
// before anything of the request can have reached a destination (the
// connection was full or ended, or the server refused the stream while it
// drains).
func (d *Dialer) muxExchange(ctx context.Context, s *transport.Stream, addr string, hello wire.ClientHello, early *earlyDial) (wire.ServerHello, *pendingAttach, error) {
	var buf bytes.Buffer
	if err := wire.WriteClientHello(&buf, hello); err != nil {
		return wire.ServerHello{}, nil, fmt.Errorf("tp dial %s: %w", addr, err)
	}
	var attach *pendingAttach
	if directClaimFrom(ctx) == nil { // a pair's opening replaces the inner session
		attach = d.earlyAttach(nil, hello, early)
	}
	buf.Write(attach.message())
	st, err := s.OpenMux(buf.Bytes())
	if err != nil {
		return wire.ServerHello{}, nil, d.muxOpenErr(s, addr, err)
	}
	stop := context.AfterFunc(ctx, func() { _ = st.SetDeadline(time.Unix(1, 0)) })
	sh, err := wire.ReadServerHello(st)
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		st.Abort(wire.QUICInternal)
		if rerr := d.rejectedBy(s.Mux, addr); rerr != nil {
			return wire.ServerHello{}, nil, rerr
		}
		s.Refused = ctx.Err() == nil && (attach == nil || !attach.sent) && transport.StreamRefused(err, s.Mux)
		switch {
		case errors.Is(err, io.EOF):
			err = fmt.Errorf("reading server hello: the TP server ended the stream without answering: %w", err)
		case err != nil:
			err = fmt.Errorf("reading server hello: %w", err)
		}
		return wire.ServerHello{}, nil, fmt.Errorf("tp dial %s via %s: %w", addr, d.Server, err)
	}
	_ = st.SetDeadline(time.Time{})
	return sh, attach, nil
}

// muxOpenErr is the error of a dial of addr whose stream could not be opened
// on s.Mux; the stream is refused (it may go on another connection) when the
// connection took no further stream, so that nothing was sent.
func (d *Dialer) muxOpenErr(s *transport.Stream, addr string, err error) error {
	if rerr := d.rejectedBy(s.Mux, addr); rerr != nil {
		return rerr
	}
	s.Refused = errors.Is(err, mux.ErrFull)
	return fmt.Errorf("tp dial %s via %s: %w", addr, d.Server, err)
}

// rejectedBy is the error of a dial on m when the server refused the
// certificate after the client's side of the handshake was done (TLS 1.3
// checks it last): its alert ended the connection. It is said as over a
// connection of its own (ErrCertificateRejected), and the ticket is dropped.
func (d *Dialer) rejectedBy(m *mux.Conn, addr string) error {
	merr := m.Err()
	if merr == nil || !strings.Contains(merr.Error(), "remote error: tls:") {
		return nil
	}
	return fmt.Errorf("tp dial %s via %s: reading server hello: %w", addr, d.Server, d.forgetRejected(explainHelloErr(merr, d.expiredAdvice)))
}
