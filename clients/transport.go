package clients

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Every request to the TP server (a TCP dial, a UDP flow, an agent's pick-up
// of a session) goes through the transport in one call, roundTrip. The
// transport picks the way to the server (a stream of a QUIC connection, a
// stream of a tp-mux connection, a TLS connection of its own), hands the
// request a stream on it, and runs the request again on another way when its
// failure says that nothing of it can have reached a service. The request
// (the hello exchange, early bytes, an end-to-end attach, the answer) does
// not choose a transport and does not retry.

// stream is one request's way to the server, handed out by the transport.
type stream struct {
	// Stream is the QUIC stream or the TLS connection; on tp-mux it is nil
	// until openMux.
	wire.Stream
	// quic is the QUIC connection the stream is on (its answers say whether
	// early bytes may go on it, earlyState); nil over TLS.
	quic *quic.Conn
	// mux, when set, is the tp-mux connection the request's stream is opened
	// on, together with the request's first bytes (openMux).
	mux *mux.Conn
	// open: a TLS connection known to be open (sessionTLS), on which first
	// bytes may go before the answer.
	open bool
	// learn: the answer to a TCP dial is remembered as what the destination
	// says of early bytes (earlyState.answered).
	learn bool

	// Set by the request, read by the transport.
	//
	// early: the request sent its first bytes without waiting for the answer;
	// it is not run again, and the spares are refilled once the answer is in
	// (earlyTunnel.wait).
	early bool
	// refused: the tp-mux stream failed before anything of the request can
	// have reached a destination.
	refused bool
}

// openMux opens the request's stream on the tp-mux connection with first, the
// request's first bytes, in the stream's opening.
func (s *stream) openMux(d *Dialer, first []byte) (*mux.Stream, error) {
	st, err := s.mux.Open(first)
	if err != nil {
		return nil, err
	}
	d.tlsMux.Counted()
	s.Stream = st
	return st, nil
}

// tripKind is what a request is, for the transport's rules.
type tripKind int

const (
	tripDial   tripKind = iota // a TCP dial
	tripUDP                    // a UDP flow (udp.go)
	tripAccept                 // an agent's pick-up of a session, over TLS (Agent.acceptTLS)
)

// trip is one request for roundTrip.
type trip struct {
	kind tripKind
	// what names the request in the errors of opening its stream.
	what string
	// early is a TCP dial's first bytes: once they may have reached a
	// service, the request is not run again (mayResend).
	early *earlyDial
	// run runs the request on s and returns the connection the caller gets.
	// It closes s on failure.
	run func(ctx context.Context, s *stream) (net.Conn, error)
}

// roundTrip runs t on a stream of the transport that the Dialer's Transport
// and what it learnt of the server pick.
func (d *Dialer) roundTrip(ctx context.Context, t trip) (net.Conn, error) {
	mode := d.mode()
	if t.kind == tripAccept {
		mode = TransportTLS // the agent was told of the session on a TLS control connection
	}
	switch mode {
	case TransportAuto, "":
		return d.tripAuto(ctx, t)
	case TransportQUIC:
		return d.tripQUIC(ctx, t)
	case TransportTLS:
		return d.tripTLS(ctx, t)
	default:
		return nil, fmt.Errorf("transport %q must be auto, quic or tls", d.Transport)
	}
}

// tripAuto uses a live QUIC connection when there is one, TLS when QUIC
// failed recently for this server (autoSkipsQUIC), and otherwise races the
// two (race) and remembers the winner.
func (d *Dialer) tripAuto(ctx context.Context, t trip) (net.Conn, error) {
	if d.liveQUIC() != nil {
		if c, conn, err := d.onQUIC(ctx, t); conn != nil && !d.quicAgain(conn, err, t) {
			return c, err
		}
	}
	if d.autoSkipsQUIC(ctx) {
		return d.tripTLS(ctx, t)
	}
	winner, tconn, err := d.race(ctx)
	if err != nil {
		return nil, err
	}
	// A fallback to TLS is remembered for less long: UDP, or a carrier, may
	// get through again.
	d.rememberTransport(winner)
	if winner == TransportTLS {
		return t.run(ctx, &stream{Stream: tconn})
	}
	return d.tripQUIC(ctx, t)
}

// tripQUIC runs t on a new stream of the Dialer's QUIC connections. If the
// connection turns out to be dead (the server restarted), it runs t once more
// on a fresh one.
func (d *Dialer) tripQUIC(ctx context.Context, t trip) (net.Conn, error) {
	c, conn, err := d.onQUIC(ctx, t)
	if conn != nil && d.quicAgain(conn, err, t) && ctx.Err() == nil {
		c, conn, err = d.onQUIC(ctx, t) // the connection died under us: once on a fresh one
	}
	if conn == nil && err != nil && !errors.Is(ctx.Err(), context.Canceled) && (d.Carrier == "" || d.Carrier == wire.CarrierUDP) {
		// No connection to the server over UDP: one sentence with the telling
		// cause, as auto's race says it (a handshake nobody answered ends in
		// quic-go's idle timeout, which explainQUICErr reads as a server that
		// stopped answering). A stream carrier's error names the carrier.
		return nil, d.unreachable(err)
	}
	return c, err
}

// onQUIC runs t on a new stream of the Dialer's QUIC connections
// (openStream); it returns the connection it used, also with an error (for
// connLost), unless connecting failed.
func (d *Dialer) onQUIC(ctx context.Context, t trip) (net.Conn, *quic.Conn, error) {
	conn, st, err := d.openStream(ctx, t.what)
	if err != nil {
		return nil, conn, err
	}
	// The hello goes out at once: the server sees a stream only once it carries data.
	c, err := t.run(ctx, &stream{Stream: st, quic: conn, learn: true})
	return c, conn, err
}

// quicAgain says whether t, which failed with err on conn, goes again on a
// fresh connection: conn is gone (connLost, which forgets it) and nothing of
// the request can have reached a service (mayResend).
func (d *Dialer) quicAgain(conn *quic.Conn, err error, t trip) bool {
	return d.connLost(conn, err) && mayResend(err, t.early)
}

// tripTLS runs t over TLS: a TCP dial or a UDP flow as a stream of a tp-mux
// connection (tlsmux.go); an older server's first request on the connection
// that found it out; then a flow on a new TLS connection, a dial or an
// accept on a new session's TLS connection, a spare when there is one
// (spare.go). A failure on a spare that says nothing about the request (the
// server closed the idle connection, or answered hello_timeout because it
// waited longer than its hello timeout) is run once more on a new connection.
func (d *Dialer) tripTLS(ctx context.Context, t trip) (net.Conn, error) {
	if !d.NoTLSMux && t.kind != tripAccept {
		c, handled, plain, err := d.tripMux(ctx, t)
		if handled {
			return c, err
		}
		if plain != nil {
			return t.run(ctx, &stream{Stream: plain, learn: true})
		}
	}
	if t.kind == tripUDP {
		// An older server, the tp-mux connections full or refusing, or
		// --no-tls-mux: a connection of its own.
		conn, err := d.connectTLS(ctx)
		if err != nil {
			return nil, err
		}
		return t.run(ctx, &stream{Stream: conn})
	}
	conn, spare, open, err := d.sessionTLS(ctx)
	if err != nil {
		return nil, err
	}
	s := &stream{Stream: conn, open: open, learn: true}
	c, err := t.run(ctx, s)
	if s.early {
		// The next spare is made once the answer is in (earlyTunnel.wait):
		// made now, its handshake would compete for the CPU with this
		// session's own setup at the server.
		return c, err
	}
	if spare && ctx.Err() == nil && retryOnNew(err, t.early) {
		if conn, err = d.connectTLS(ctx); err != nil {
			return nil, err
		}
		// The second attempt waits for the answer before its first bytes.
		c, err = t.run(ctx, &stream{Stream: conn, learn: true})
	}
	if t.kind != tripAccept {
		// (An agent refills after an accept once its session has its first
		// answer, Agent.acceptTLS, so that the handshake does not compete with
		// the session's own setup for the CPU.)
		d.refillSpare()
	}
	return c, err
}

// tripMux runs t as a stream of a tp-mux connection. A dial whose stream was
// refused before anything of it can have reached a destination goes again,
// up to 3 times, on a connection that takes it; a flow goes on a connection
// of its own (handled false). handled is also false when the server does not
// speak tp-mux/1: plain is then a new tp/1 connection for the request, or nil.
func (d *Dialer) tripMux(ctx context.Context, t trip) (c net.Conn, handled bool, plain *tls.Conn, err error) {
	for attempt := 0; ; attempt++ {
		m, plain, err := d.tlsMux.Conn(ctx, (*muxClient)(d))
		if err != nil || m == nil {
			return nil, err != nil, plain, err
		}
		s := &stream{mux: m, learn: true}
		c, err := t.run(ctx, s)
		if t.kind == tripUDP {
			if s.refused || err != nil && errors.Is(err, mux.ErrRefused) && ctx.Err() == nil {
				// The server refused the stream unserved (it drains): on a
				// connection of its own.
				return nil, false, nil, nil
			}
		} else if s.refused && attempt < 3 && ctx.Err() == nil {
			continue // nothing of the request reached a destination: on another connection
		}
		return c, true, nil, err
	}
}

// race connects over QUIC and, after the head start or as soon as QUIC fails,
// over TLS; the first to complete wins and the other attempt is abandoned. On a
// TLS win it returns the TLS connection; on a QUIC win the shared connection is set.
func (d *Dialer) race(ctx context.Context) (string, *tls.Conn, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		transport string
		conn      *tls.Conn
		err       error
	}
	results := make(chan result, 2)
	go func() {
		_, err := d.quicConn(ctx)
		results <- result{transport: TransportQUIC, err: err}
	}()
	head := d.HeadStart
	if head <= 0 {
		head = DefaultHeadStart
	}
	var headStartOver <-chan time.Time
	if d.racesCarriers() {
		// QUIC over a stream carrier keeps QUIC's features (streams without
		// head-of-line blocking between them, UDP flows, moving between
		// networks and carriers): plain TLS starts only when QUIC got through
		// on no carrier.
	} else if d.quic.headStartTimer != nil {
		headStartOver = d.quic.headStartTimer(head)
	} else {
		timer := time.NewTimer(head)
		defer timer.Stop()
		headStartOver = timer.C
	}
	startTLS := func() {
		go func() {
			c, err := d.connectTLS(ctx)
			results <- result{transport: TransportTLS, conn: c, err: err}
		}()
	}
	pending, tlsStarted := 1, false
	var errs []error
	var grace <-chan time.Time
	for pending > 0 {
		select {
		case <-headStartOver:
			if !tlsStarted {
				tlsStarted = true
				pending++
				startTLS()
			}
		case <-grace:
			// TLS failed and QUIC had its grace period too: the server is
			// unreachable, no need to sit out the QUIC handshake timeout.
			cancel()
			grace = nil
		case r := <-results:
			pending--
			if r.err == nil {
				cancel()
				// Close a TLS connection that completes after QUIC won.
				go func(n int) {
					for range n {
						if late := <-results; late.conn != nil {
							_ = late.conn.Close()
						}
					}
				}(pending)
				return r.transport, r.conn, nil
			}
			errs = append(errs, r.err)
			if r.transport == TransportTLS && pending > 0 {
				grace = time.After(max(head, quicGrace))
			}
			if !tlsStarted {
				tlsStarted = true
				pending++
				startTLS()
			}
		}
	}
	for _, err := range slices.Backward(errs) { // TLS's error, which says the most, last
		if ce := (*login.ConnectError)(nil); errors.As(err, &ce) {
			// Nothing listens on the TCP port, or something other than tpd
			// does: QUIC's silence says no more (it is not a blocked UDP).
			return "", nil, err
		}
	}
	return "", nil, errors.Join(errs...)
}

// autoSkipsQUIC reports whether transport auto goes straight to TP's plain
// TLS transport: it won a race recently (in this process, or remembered for
// this server and network), or the server's discovery document offers no
// QUIC.
func (d *Dialer) autoSkipsQUIC(ctx context.Context) bool {
	d.quic.mu.Lock()
	tlsWon := time.Now().Before(d.quic.tlsUntil)
	d.quic.mu.Unlock()
	return tlsWon || d.Cache != nil && d.Cache.Get(d.Server) == TransportTLS || d.quicNotOffered(ctx)
}

// rememberTransport remembers that transport (TransportQUIC or
// TransportTLS) won auto's choice for the server on this network; TLS, a
// fallback, for DefaultFallbackTTL only, after which QUIC is tried again.
func (d *Dialer) rememberTransport(transport string) {
	if transport == TransportTLS {
		d.quic.mu.Lock()
		d.quic.tlsUntil = time.Now().Add(DefaultFallbackTTL)
		d.quic.mu.Unlock()
	}
	if d.Cache == nil {
		return
	}
	ttl := time.Duration(0)
	if transport == TransportTLS {
		ttl = DefaultFallbackTTL
	}
	_ = d.Cache.PutFor(d.Server, transport, ttl) // a cache that cannot be written only costs races
}

// retryOnNew says whether a request that failed with err on a spare connection
// goes again on a new one: when the failure says nothing about the request (the
// server closed the idle connection, or answered hello_timeout because it
// waited longer than its hello timeout). Not after a failure without an answer
// when the dial's first bytes went sealed in an attach: the server may have
// passed them on to the agent before the connection failed, and a request must
// not reach a service twice (as for early bytes over QUIC, early.go).
func retryOnNew(err error, early *earlyDial) bool {
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

// mayResend says whether a dial that failed with err may go again on another
// connection: not once its first bytes went sealed in an attach (they may have
// reached the service), unless the server answered with a stateless reset (it
// held nothing of the connection, so it saw neither the hello nor the bytes).
func mayResend(err error, early *earlyDial) bool {
	return early == nil || !early.sealed || errors.As(err, new(*quic.StatelessResetError))
}

// quicGrace is how long auto still waits for QUIC after TLS failed.
const quicGrace = time.Second
