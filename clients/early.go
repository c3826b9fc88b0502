package clients

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A dial that sends its first bytes right behind the hello, without waiting for
// the server's answer (docs/PROTOCOL.md, section 6.5), saves a round trip to the
// server on every new tunnel: the answer and the destination's first reply come
// back together. Two things make it safe, and a dial sends early bytes only when
// both hold:
//
//   - The destination is known to answer without end-to-end TLS: bytes sent
//     early to a protected reverse name would reach its agent outside the inner
//     TLS session. The Dialer remembers which destinations answered an ok without
//     "e2e" over QUIC, and forgets one that answers otherwise.
//   - The QUIC connection answered a request within earlyFresh: a connection that
//     died unnoticed (the server restarted while it idled) would take the bytes
//     with it, and a dial whose bytes already left cannot be retried on a new
//     connection the way one that waits for the answer is.

// earlyFresh is how recently the QUIC connection must have answered a request.
const earlyFresh = 2 * time.Second

// maxPlainDests bounds the destinations an earlyState remembers.
const maxPlainDests = 1024

// earlyState is what a Dialer knows about sending early bytes on its QUIC connection.
type earlyState struct {
	mu    sync.Mutex
	conn  *quic.Conn          // the connection last is about
	last  time.Time           // when conn last answered a request
	plain map[string]struct{} // destinations (as dialed) whose last answer was an ok without e2e
	fresh time.Duration       // earlyFresh when zero; tests that must not depend on timing lengthen it
}

// allows reports whether a dial of addr on conn may send early bytes.
func (s *earlyState) allows(conn *quic.Conn, addr string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, plain := s.plain[addr]
	fresh := s.fresh
	if fresh == 0 {
		fresh = earlyFresh
	}
	return plain && s.conn == conn && time.Since(s.last) < fresh
}

// plainDest reports whether addr's last answer was an ok without e2e, whatever
// the connection: over TLS each dial has a connection of its own, whose being
// open the caller checks (sessionTLS).
func (s *earlyState) plainDest(addr string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, plain := s.plain[addr]
	return plain
}

// earlyState is what the Dialer knows about early bytes on conn, a QUIC
// connection, or nil for TLS.
func (d *Dialer) earlyState(conn *quic.Conn) *earlyState {
	if conn == nil {
		return &d.tlsEarly
	}
	return &d.quicEarly
}

// answered records the server's answer sh to a dial of addr on conn.
func (s *earlyState) answered(conn *quic.Conn, addr string, sh wire.ServerHello) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conn, s.last = conn, time.Now()
	if !sh.OK || sh.E2E {
		delete(s.plain, addr)
		return
	}
	if _, ok := s.plain[addr]; ok {
		return
	}
	if s.plain == nil || len(s.plain) >= maxPlainDests {
		s.plain = make(map[string]struct{}) // bounded: start over rather than grow
	}
	s.plain[addr] = struct{}{}
}

// DialEarly is DialContext for a connection whose first bytes should not wait
// for the server's answer, such as a port forward's local connection. When the
// QUIC connection is in use and known to be alive (over TLS: when the session's
// connection is new, or a spare whose TCP connection the server has not
// closed), and addr is known to be no protected reverse name (see above), it
// returns as soon as the hello is sent:
// up to wire.MaxEarlyData bytes written then travel right behind it, and the
// server delivers them to the destination after its ok, in order, or discards
// them with its refusal. The answer is read by the first Read (or by a Write
// beyond that amount, or CloseWrite), which returns a refusal as a
// *RefusedError. In every other case DialEarly is DialContext.
func (d *Dialer) DialEarly(ctx context.Context, network, addr string) (net.Conn, error) {
	return d.dial(ctx, network, addr, &earlyDial{})
}

// DialFirst is DialEarly that also sends first, the bytes a local client had
// already sent when its connection was accepted: in the same packet as the
// hello when the dial sends early bytes, else right after the server's ok. It
// must be a TCP dial, and first at most wire.MaxEarlyData bytes.
func (d *Dialer) DialFirst(ctx context.Context, network, addr string, first []byte) (net.Conn, error) {
	if len(first) > wire.MaxEarlyData {
		return nil, fmt.Errorf("tp dial %s: %d first bytes; at most %d go with the request", addr, len(first), wire.MaxEarlyData)
	}
	if len(first) > 0 && !strings.HasPrefix(network, "tcp") {
		return nil, fmt.Errorf("tp dial %s: first bytes go only with a TCP dial, not %q", addr, network)
	}
	early := &earlyDial{first: first}
	c, err := d.dial(ctx, network, addr, early)
	if err != nil || early.sent || len(first) == 0 {
		return c, err
	}
	if _, err := c.Write(first); err != nil {
		wire.Abort(c, wire.QUICPeerReset)
		return nil, err
	}
	return c, nil
}

// earlyDial is a dial that may return before the server's answer.
type earlyDial struct {
	first []byte // to send with the hello
	sent  bool   // first went with the hello
	// sealed: first went in an attach (e2eattach.go), answered or not; a dial
	// whose first bytes may have reached the service is not sent again.
	sealed bool
}

// mayEarly says whether a dial of addr may send its first bytes on s right
// behind the hello, without waiting for the answer: over QUIC when the
// connection answered recently (earlyState.allows), over a TLS connection of
// its own when it is known to be open, on tp-mux when the connection heard
// from the server recently (mayEarlyMux); always only to a destination known
// to answer without end-to-end TLS.
func (d *Dialer) mayEarly(s *transport.Stream, addr string, early *earlyDial) bool {
	switch {
	case s.QUIC != nil:
		return d.quicEarly.allows(s.QUIC, addr)
	case s.Mux != nil:
		return d.mayEarlyMux(s.Mux, addr, early)
	}
	return s.Open && d.tlsEarly.plainDest(addr)
}

// requestEarly sends hello and early.first on s in one write (on tp-mux: in
// the stream's opening), and returns the stream without waiting for the
// answer.
func (d *Dialer) requestEarly(ctx context.Context, s *transport.Stream, addr string, hello wire.ClientHello, early *earlyDial) (net.Conn, error) {
	deadline, _ := ctx.Deadline() // dial always sets one: the answer is read within the dial's bound
	var buf bytes.Buffer
	if err := wire.WriteClientHello(&buf, hello); err != nil {
		if s.Stream != nil {
			_ = s.Close()
		}
		return nil, fmt.Errorf("tp dial %s: %w", addr, err)
	}
	buf.Write(early.first)
	if s.Mux != nil {
		if _, err := s.OpenMux(buf.Bytes()); err != nil {
			return nil, d.muxOpenErr(s, addr, err)
		}
	} else {
		_ = s.SetWriteDeadline(deadline)
		if _, err := s.Write(buf.Bytes()); err != nil {
			_ = s.Close()
			return nil, &exchangeError{fmt.Errorf("tp dial %s via %s: sending client hello: %w", addr, d.Server, d.forgetRejected(explainHelloErr(err, d.expiredAdvice)))}
		}
		_ = s.SetWriteDeadline(time.Time{})
	}
	early.sent = true
	if s.Mux == nil {
		// The write only queued the request: quic-go's connection goroutine
		// packs and sends it. Yield to it now, before this goroutine goes on
		// to start the tunnel's relay: the scheduler would otherwise run the
		// new relay goroutine first and the request would leave tens of µs
		// later on a busy machine.
		runtime.Gosched()
	}
	return &earlyTunnel{st: s.Stream, d: d, conn: s.QUIC, addr: addr, hello: hello, ctx: context.WithoutCancel(ctx), deadline: deadline,
		sent: len(early.first), early: bytes.Clone(early.first)}, nil
}

// earlyTunnel is a dial whose hello is sent and whose answer is read when first
// needed. One goroutine may Write while another Reads, as a bridge does.
type earlyTunnel struct {
	st       wire.Stream
	d        *Dialer
	conn     *quic.Conn
	addr     string
	hello    wire.ClientHello
	ctx      context.Context // the dial's values, for an end-to-end handshake after the answer
	deadline time.Time       // the dial's bound, which the answer must meet

	wmu      sync.Mutex // orders early Writes with the answer's arrival
	sent     int        // bytes written before the answer
	early    []byte     // those bytes, to send again on a new connection (retry)
	answered bool       // the answer arrived: Writes go through tun

	amu  sync.Mutex // held while the answer is read
	done bool       // under amu
	tun  net.Conn   // after an ok
	err  error      // the refusal or failure, after done

	tmu sync.Mutex // publishes tun to Close, Unwrap and deadlines, which must not wait for amu
	pub net.Conn
}

var _ wire.Stream = (*earlyTunnel)(nil)

// wait reads the server's answer once and returns the tunnel or why there is none.
func (e *earlyTunnel) wait() (net.Conn, error) {
	e.amu.Lock()
	defer e.amu.Unlock()
	if e.done {
		return e.tun, e.err
	}
	e.done = true
	_ = e.st.SetReadDeadline(e.deadline)
	sh, err := wire.ReadServerHello(e.st)
	_ = e.st.SetReadDeadline(time.Time{})
	e.wmu.Lock()
	e.answered = true
	sent, early := e.sent, e.early
	e.early = nil
	e.wmu.Unlock()
	if err != nil && errors.As(err, new(*quic.StatelessResetError)) {
		// The server no longer knew the connection (it restarted): it has seen
		// neither the hello nor the bytes, so the request goes again, whole.
		ctx, cancel := context.WithDeadline(e.ctx, e.deadline)
		defer cancel()
		if tun, rerr := e.retry(ctx, err, early); rerr == nil {
			_ = e.st.Close()
			e.tun = tun
			e.publish(tun)
			return tun, nil
		}
	}
	switch {
	case errors.Is(err, io.EOF):
		err = fmt.Errorf("reading server hello: the TP server closed the connection without answering: %w", err)
	case errors.Is(err, io.ErrUnexpectedEOF):
		err = fmt.Errorf("reading server hello: the TP server's answer was cut short: %w", err)
	case err != nil:
		err = fmt.Errorf("reading server hello: %w", err)
	}
	if err != nil {
		wire.Abort(e.st, wire.QUICPeerReset)
		e.err = fmt.Errorf("tp dial %s via %s: %w", e.addr, e.d.Server, e.d.forgetRejected(explainHelloErr(err, e.d.expiredAdvice)))
		return nil, e.err
	}
	e.d.earlyState(e.conn).answered(e.conn, e.addr, sh)
	if e.conn == nil {
		e.d.transport().Answered() // a TLS session's
	}
	if sh.OK && sh.E2E && sent > 0 {
		// The name became a protected one since its last answer: the bytes sent
		// went outside end-to-end TLS, so the session must not go on.
		wire.Abort(e.st, wire.QUICPeerReset)
		e.err = fmt.Errorf("tp dial %s: the destination now answers with end-to-end TLS (a protected reverse name), but this connection's first bytes were already sent without it; the session was aborted, connect again", e.addr)
		return nil, e.err
	}
	ctx, cancel := context.WithDeadline(e.ctx, e.deadline)
	defer cancel()
	e.tun, e.err = e.d.answer(ctx, e.st, e.addr, e.hello, sh, nil) // early bytes never go to a protected name
	e.publish(e.tun)
	return e.tun, e.err
}

// retry runs the request again on a new connection, after err showed that the
// old one is gone, and sends early there once the server said ok.
func (e *earlyTunnel) retry(ctx context.Context, err error, early []byte) (net.Conn, error) {
	e.d.transport().ConnLost(e.conn, err) // waits for the connection's end and forgets it, so that the pool makes a new one
	tun, err := e.d.transport().RunOnQUIC(ctx, e.d.dialTrip(e.addr, e.hello, nil))
	if err != nil {
		return nil, err
	}
	if len(early) > 0 {
		if _, err := tun.Write(early); err != nil {
			wire.Abort(tun, wire.QUICPeerReset)
			return nil, err
		}
	}
	return tun, nil
}

func (e *earlyTunnel) publish(tun net.Conn) {
	if tun == nil {
		return
	}
	e.tmu.Lock()
	e.pub = tun
	e.tmu.Unlock()
}

var _ wire.Settler = (*earlyTunnel)(nil)

// Settled is the tunnel once the answer was an ok (Read then reads it), else
// nil: Bridge reads it directly, waiting as it waits on any tunnel.
func (e *earlyTunnel) Settled() net.Conn {
	e.tmu.Lock()
	defer e.tmu.Unlock()
	return e.pub
}

// live is what Close, Abort and deadlines act on: the tunnel once there is one.
func (e *earlyTunnel) live() net.Conn {
	e.tmu.Lock()
	defer e.tmu.Unlock()
	if e.pub != nil {
		return e.pub
	}
	return e.st
}

func (e *earlyTunnel) Read(p []byte) (int, error) {
	tun, err := e.wait()
	if err != nil {
		return 0, err
	}
	return tun.Read(p)
}

func (e *earlyTunnel) Write(p []byte) (int, error) {
	e.wmu.Lock()
	if !e.answered && e.sent+len(p) <= wire.MaxEarlyData {
		n, err := e.st.Write(p)
		e.sent += n
		e.early = append(e.early, p[:n]...)
		e.wmu.Unlock()
		if err != nil {
			// The server may have refused and stopped reading: its answer says why.
			if _, aerr := e.wait(); aerr != nil {
				return n, aerr
			}
		}
		return n, err
	}
	e.wmu.Unlock()
	tun, err := e.wait()
	if err != nil {
		return 0, err
	}
	return tun.Write(p)
}

// CloseWrite half-closes once the answer is in: an end of the stream must not
// come before an end-to-end handshake that the answer may ask for.
func (e *earlyTunnel) CloseWrite() error {
	tun, err := e.wait()
	if err != nil {
		return err
	}
	return tun.(wire.Stream).CloseWrite()
}

func (e *earlyTunnel) Close() error {
	err := e.live().Close()
	_ = e.st.Close() // the first stream, if a retry replaced it
	return err
}

// Unwrap is what the tunnel runs on (wire.Abort resets it).
func (e *earlyTunnel) Unwrap() net.Conn { return e.live() }

func (e *earlyTunnel) LocalAddr() net.Addr                { return e.live().LocalAddr() }
func (e *earlyTunnel) RemoteAddr() net.Addr               { return e.live().RemoteAddr() }
func (e *earlyTunnel) SetDeadline(t time.Time) error      { return e.live().SetDeadline(t) }
func (e *earlyTunnel) SetReadDeadline(t time.Time) error  { return e.live().SetReadDeadline(t) }
func (e *earlyTunnel) SetWriteDeadline(t time.Time) error { return e.live().SetWriteDeadline(t) }

// mayEarlyMux says whether a dial of addr on m may open its stream with its
// first bytes right behind the hello: the destination answered without
// end-to-end TLS, and m heard from the server within earlyFresh.
func (d *Dialer) mayEarlyMux(m *mux.Conn, addr string, early *earlyDial) bool {
	return !early.sent && d.tlsEarly.plainDest(addr) && m.SinceRead() < earlyFresh
}
