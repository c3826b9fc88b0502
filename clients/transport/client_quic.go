package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/qlogwriter"

	"github.com/tp-proxy/tp/internal/lib/udpgro"
	"github.com/tp-proxy/tp/proxy/wire"
)

// DefaultHeadStart is how long auto waits for the QUIC handshake before it also
// tries TLS. A QUIC handshake takes one round trip, TCP plus TLS two, so on a
// network where UDP works QUIC normally wins even without it.
const DefaultHeadStart = 150 * time.Millisecond

// quicState is a Client's shared QUIC connection.
type quicState struct {
	mu      sync.Mutex
	udp     net.PacketConn // a *net.UDPConn, or a *CarrierConn (carrier.go)
	tr      *quic.Transport
	conn    *quic.Conn
	dialing chan struct{} // closed when the connect in flight ends
	changed chan struct{} // closed (and replaced) whenever conn is replaced
	closed  bool
	// tlsUntil: TLS won a race; auto skips QUIC until then (also without a Cache).
	tlsUntil time.Time
	// extra are further connections, opened when conn had no stream credit left
	// (quicpool.go); extraDialing is closed when the connect in flight for one ends.
	extra        []*extraConn
	extraDialing chan struct{}
	// poolIdle, when set, replaces DefaultQUICPoolIdle (tests).
	poolIdle time.Duration
	// drops counts DATAGRAM frames quic-go discarded with its receive queue full.
	drops wire.DatagramDropCounter
	// moves are the carriers the connection moved to (switch.go).
	moves []carrierSwitch
	// headStartTimer, when set, replaces the head start's timer in race: a test
	// decides when the head start is over.
	headStartTimer func(time.Duration) <-chan time.Time
	// open counts request streams not yet closed or aborted by their caller:
	// with none, Close says "bye" before it closes a connection.
	open atomic.Int64
}

// counted is a request stream that counts in q.open until closed or aborted.
func (q *quicState) counted(st *wire.QUICStream) *ClientStream {
	q.open.Add(1)
	return &ClientStream{QUICStream: st, open: &q.open}
}

// ErrClosed is returned by a Client after Close.
var ErrClosed = errors.New("the TP dialer is closed")

// Close closes the Client's QUIC connections and socket (streams on them end) and
// its spare TLS connection. When every request stream was closed (each session
// ended cleanly, or was aborted), Close first says "bye" on each connection and
// waits, bounded by byeBound, for the server's answer: the server gives it once
// it has read every session's last bytes and FIN, which a CONNECTION_CLOSE
// before that would discard (the destination would see a reset, the server log
// a cut). Otherwise, or when the server does not answer, what the connections
// queued is sent first (flushBeforeClose) and the open sessions are cut.
func (cl *Client) Close() error {
	cl.closeSpare()
	q := &cl.quic
	q.mu.Lock()
	q.closed = true
	var conns []*quic.Conn
	if q.conn != nil {
		conns = append(conns, q.conn)
		q.conn = nil
	}
	for _, e := range q.extra {
		if e.idle != nil {
			e.idle.Stop()
			e.idle = nil
		}
		conns = append(conns, e.conn)
	}
	q.extra = nil
	tr, udp := q.tr, q.udp
	q.tr, q.udp = nil, nil
	q.moves = nil
	q.mu.Unlock()
	allClosed := q.open.Load() == 0
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			if !allClosed || !sayBye(c) {
				flushBeforeClose(c)
			}
			_ = c.CloseWithError(wire.QUICNoError, "")
		})
	}
	wg.Wait()
	if tr != nil {
		_ = tr.Close()
		_ = udp.Close()
	}
	return nil
}

// byeBound bounds how long Close waits for the answer to "bye".
const byeBound = 3 * time.Second

// sayBye sends op "bye" on conn and reports whether the server answered ok
// within byeBound: it then served every other stream of conn to its end
// (docs/PROTOCOL.md, section 3.9). A server that does not know the op
// refuses it at once.
func sayBye(conn *quic.Conn) bool {
	if conn.Context().Err() != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(conn.Context(), byeBound)
	defer cancel()
	str, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return false
	}
	st := wire.NewQUICStream(conn, str)
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(byeBound))
	if err := wire.WriteClientHello(st, wire.ClientHello{V: wire.Version, Op: wire.OpBye}); err != nil {
		return false
	}
	_ = st.CloseWrite()
	sh, err := wire.ReadServerHello(st)
	return err == nil && sh.OK
}

// flushBound bounds how long flushBeforeClose waits.
const flushBound = 250 * time.Millisecond

// flushBeforeClose waits until conn has sent what it queued and the server
// answered after that (its acknowledgement, in practice), or until nothing was
// sent for a while (nothing was queued): quic-go drops what it has not sent
// yet when a connection closes, so a session's last frames would otherwise be
// overtaken by the close, and the server would take a session that ended
// cleanly (its FIN queued, not sent) for one its client cut. Only an answer
// after a send counts: one that came before the queued frames went out says
// nothing about them. Bounded by flushBound.
func flushBeforeClose(conn *quic.Conn) {
	st := conn.ConnectionStats()
	quiet := min(max(2*st.SmoothedRTT+25*time.Millisecond, 5*time.Millisecond), flushBound)
	sent, recvAtSend, since := st.PacketsSent, st.PacketsReceived, time.Now()
	sending := false // a packet went out since the flush began
	for deadline := time.Now().Add(flushBound); time.Now().Before(deadline); {
		select {
		case <-conn.Context().Done():
			return
		case <-time.After(time.Millisecond):
		}
		now := conn.ConnectionStats()
		switch {
		case now.PacketsSent != sent: // still sending
			sent, recvAtSend, since, sending = now.PacketsSent, now.PacketsReceived, time.Now(), true
		case sending && now.PacketsReceived > recvAtSend, time.Since(since) >= quiet:
			return // answered after the last send, or nothing left to send
		}
	}
}

func (cl *Client) quicAddr() string {
	if cl.QUICServer != "" {
		return cl.QUICServer
	}
	return cl.Server
}

// LiveQUIC returns the current QUIC connection if it is still open.
func (cl *Client) LiveQUIC() *quic.Conn {
	q := &cl.quic
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.conn != nil && q.conn.Context().Err() == nil {
		return q.conn
	}
	return nil
}

// quicConn returns the shared QUIC connection, connecting (or reconnecting after
// it died) when needed. Concurrent callers share one connect attempt; if that
// attempt's caller gives up, the others try for themselves.
func (cl *Client) quicConn(ctx context.Context) (*quic.Conn, error) {
	q := &cl.quic
	for {
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return nil, ErrClosed
		}
		if q.conn != nil && q.conn.Context().Err() == nil {
			c := q.conn
			q.mu.Unlock()
			return c, nil
		}
		if ch := q.dialing; ch != nil {
			q.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, fmt.Errorf("connecting to TP server %s over QUIC: %w", cl.quicAddr(), ctx.Err())
			}
		}
		ch := make(chan struct{})
		q.dialing = ch
		q.mu.Unlock()

		c, err := cl.connectMain(ctx)

		q.mu.Lock()
		q.dialing = nil
		close(ch)
		if err == nil {
			if q.closed {
				q.mu.Unlock()
				_ = c.CloseWithError(wire.QUICNoError, "")
				return nil, ErrClosed
			}
			q.conn = c
			if mc, movable := q.udp.(*MovingConn); movable {
				go cl.watchCarrier(c, mc)
			}
			if q.changed != nil {
				close(q.changed)
			}
			q.changed = make(chan struct{})
		}
		q.mu.Unlock()
		return c, err
	}
}

// connectMain connects the Client's shared QUIC connection: by the carrier
// race (race.go) when the Client races, on its socket otherwise.
func (cl *Client) connectMain(ctx context.Context) (*quic.Conn, error) {
	if !cl.racesCarriers() {
		return cl.connectQUIC(ctx)
	}
	cfg, qcfg, err := cl.quicConfigs()
	if err != nil {
		return nil, err
	}
	r, err := cl.raceCarriers(ctx, cfg, qcfg)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (no answer over UDP or any carrier: is the TP server reachable from this network?)", errors.Join(err, ctx.Err()))
		}
		return nil, fmt.Errorf("connecting to TP server %s over QUIC: %w", cl.quicAddr(), cl.forgetRejected(ExplainQUIC(err, cl.expiredAdvice)))
	}
	cl.installRaced(r)
	StartNudges(r.conn, cl.keepAlive())
	return r.conn, nil
}

// connectQUIC performs a QUIC handshake with the server on the Client's socket.
func (cl *Client) connectQUIC(ctx context.Context) (*quic.Conn, error) {
	addr := cl.quicAddr()
	tr, err := cl.packetTransport(ctx)
	if err != nil {
		return nil, err
	}
	var raddr net.Addr
	if cc, ok := tr.Conn.(*CarrierConn); ok {
		raddr = cc.ServerAddr()
	} else if mc, ok := tr.Conn.(*MovingConn); ok {
		raddr = mc.ServerAddr()
	} else if raddr, err = resolveUDP(ctx, addr); err != nil {
		return nil, err
	}
	cfg, qcfg, err := cl.quicConfigs()
	if err != nil {
		return nil, err
	}
	qcfg = configFor(tr.Conn, qcfg)
	var conn *quic.Conn
	if cl.racesCarriers() { // a further connection, on the race winner's socket
		conn, err = tr.Dial(ctx, raddr, cfg, qcfg)
	} else {
		conn, err = cl.dialFallingBack(ctx, tr, raddr, cfg, qcfg)
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (no answer over UDP; is UDP blocked on this network? --carrier tls or ws, or --transport tls, avoid UDP)", ctx.Err())
		}
		return nil, fmt.Errorf("connecting to TP server %s over QUIC: %w", addr, cl.forgetRejected(ExplainQUIC(err, cl.expiredAdvice)))
	}
	StartNudges(conn, cl.keepAlive())
	return conn, nil
}

// quicConfigs are the TLS and QUIC configurations of the Client's connections.
func (cl *Client) quicConfigs() (*tls.Config, *quic.Config, error) {
	cfg, err := cl.tlsConfig()
	if err != nil {
		return nil, nil, err
	}
	keepAlive := cl.keepAlive()
	idle := cl.IdleTimeout
	if idle <= 0 {
		idle = 60 * time.Second
	}
	// The handshake may go as long without an answer as the whole setup may
	// take (Timeout), not quic-go's 5 s: a busy server answers late rather
	// than never, and a silent one is then said to be silent for as long as
	// the message about it says (reachCause).
	setup := cl.Timeout
	if setup <= 0 {
		setup = DefaultTimeout
	}
	qcfg := &quic.Config{
		HandshakeIdleTimeout:           setup,
		KeepAlivePeriod:                keepAlive,
		MaxIdleTimeout:                 idle,
		MaxIncomingStreams:             -1, // the server opens no streams
		MaxIncomingUniStreams:          -1,
		InitialStreamReceiveWindow:     wire.QUICInitialStreamWindow,
		MaxStreamReceiveWindow:         wire.QUICMaxStreamWindow,
		InitialConnectionReceiveWindow: wire.QUICInitialConnWindow,
		MaxConnectionReceiveWindow:     wire.QUICMaxConnWindow,
		EnableDatagrams:                true, // UDP flows (udp.go)
		Tracer:                         cl.dropTracer(),
	}
	return cfg, qcfg, nil
}

// keepAlive is the QUIC keepalive period of the Client's connections, 0 for
// none.
func (cl *Client) keepAlive() time.Duration {
	switch {
	case cl.KeepAlive == 0 && cl.Carrier != "" && cl.Carrier != wire.CarrierUDP:
		return DefaultCarrierKeepAlive
	case cl.KeepAlive == 0:
		return 15 * time.Second
	case cl.KeepAlive < 0:
		return 0
	}
	return cl.KeepAlive
}

// DefaultCarrierKeepAlive is the QUIC keepalive of a Client whose Carrier is
// not "udp" (tls, ws, http or auto) and whose KeepAlive is zero. When a
// carrier's link is replaced (it broke, or the connection moved to another
// carrier), the server sees the client at a new address and sends there only
// once a packet from the client arrives over the new link. A client that only
// receives (a download) sends nothing by itself, so without a PING after a
// second of silence it would wait for the 15 s keepalive: the move took 15 s
// in TestCarrierMatrix before this.
const DefaultCarrierKeepAlive = time.Second

func resolveUDP(ctx context.Context, addr string) (*net.UDPAddr, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("TP server address %q: %w", addr, err)
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, fmt.Errorf("connecting to TP server %s over QUIC: %w", addr, err)
	}
	raddr, err := net.ResolveUDPAddr("udp", net.JoinHostPort(ips[0].Unmap().String(), port))
	if err != nil {
		return nil, fmt.Errorf("TP server address %q: %w", addr, err)
	}
	return raddr, nil
}

// transport returns the Client's packet conn (a UDP socket, or the carrier's:
// carrier.go) and QUIC transport, opening them once; a carrier's first link
// is opened within ctx.
func (cl *Client) packetTransport(ctx context.Context) (*quic.Transport, error) {
	q := &cl.quic
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil, ErrClosed
	}
	if q.tr != nil {
		tr := q.tr
		q.mu.Unlock()
		return tr, nil
	}
	q.mu.Unlock()
	pc, err := cl.openPacketConn(ctx, cl.carrier())
	if err != nil {
		return nil, err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		_ = pc.Close()
		return nil, ErrClosed
	}
	if q.tr != nil { // another caller was quicker
		_ = pc.Close()
		return q.tr, nil
	}
	q.udp, q.tr = pc, &quic.Transport{Conn: pc}
	return q.tr, nil
}

// openPacketConn opens what carries QUIC packets on the named carrier.
func (cl *Client) openPacketConn(ctx context.Context, kind string) (net.PacketConn, error) {
	if kind == wire.CarrierUDP {
		udp, err := net.ListenUDP("udp", nil)
		if err != nil {
			return nil, fmt.Errorf("opening a UDP socket for QUIC: %w", err)
		}
		if cl.Carrier == CarrierAuto || len(cl.FallbackCarriers) > 0 {
			raddr, err := resolveUDP(ctx, cl.quicAddr())
			if err != nil {
				_ = udp.Close()
				return nil, err
			}
			return NewMovingConn(udp, raddr), nil
		}
		return udpgro.Wrap(udp), nil
	}
	dial, err := cl.carrierDialer(kind)
	if err != nil {
		return nil, err
	}
	return NewCarrierConn(ctx, kind, cl.Server, dial)
}

// connLost reports whether err means conn itself is gone (the server restarted,
// went silent or closed it), so a request that failed with err may be retried on
// a new connection. quic-go fails a connection's streams before it cancels the
// connection's context, so the error is judged by its type, and connLost waits
// (briefly) for the context too: the next quicConn must not hand out conn again.
func connLost(conn *quic.Conn, err error) bool {
	if err == nil {
		return false
	}
	if conn.Context().Err() != nil {
		return true
	}
	var ce *wire.QUICConnError
	var ae *quic.ApplicationError
	var te *quic.TransportError
	if !errors.As(err, &ce) && !errors.As(err, &ae) && !errors.As(err, &te) &&
		!errors.As(err, new(*quic.StatelessResetError)) && !errors.As(err, new(*quic.IdleTimeoutError)) {
		return false // a stream-level failure (refused, reset): the connection is fine
	}
	select {
	case <-conn.Context().Done():
	case <-time.After(time.Second): // bound: quic-go cancels right after failing the streams
	}
	return true
}

// connLost is connLost, and when conn is gone the Client forgets it, so that
// no request (the retry after err first) is handed conn again: quic-go fails a
// connection's streams before it cancels the connection's context, and under
// load its goroutine may not have cancelled it when connLost's wait ends.
func (cl *Client) connLost(conn *quic.Conn, err error) bool {
	if !connLost(conn, err) {
		return false
	}
	cl.quic.forget(conn)
	return true
}

// forget drops conn, which is gone, from the shared connection and the
// further ones.
func (q *quicState) forget(conn *quic.Conn) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.conn == conn {
		q.conn = nil
	}
	for i, e := range q.extra {
		if e.conn == conn {
			if e.idle != nil {
				e.idle.Stop()
				e.idle = nil
			}
			q.extra = slices.Delete(q.extra, i, i+1)
			break
		}
	}
}

// ClientStream is a request stream on a QUIC connection to the server; its
// errors say a broken connection from the client's point of view.
type ClientStream struct {
	*wire.QUICStream
	// open, when set, counts the Client's request streams the caller has not
	// closed or aborted yet (quicState.open): Close says "bye" only when
	// there are none.
	open *atomic.Int64
	once sync.Once
}

func (c *ClientStream) ended() {
	if c.open != nil {
		c.once.Do(func() { c.open.Add(-1) })
	}
}

func (c *ClientStream) Close() error {
	err := c.QUICStream.Close()
	c.ended()
	return err
}

func (c *ClientStream) Abort(code quic.ApplicationErrorCode) {
	c.QUICStream.Abort(code)
	c.ended()
}

func (c *ClientStream) Read(p []byte) (int, error) {
	n, err := c.QUICStream.Read(p)
	return n, clientSideErr(err)
}

func (c *ClientStream) Write(p []byte) (int, error) {
	n, err := c.QUICStream.Write(p)
	return n, clientSideErr(err)
}

func clientSideErr(err error) error {
	var ce *wire.QUICConnError
	if err != nil && errors.As(err, &ce) {
		// Keep ce in the chain, not quic-go's error: that one unwraps to
		// net.ErrClosed and would make the break look like an ordinary end.
		return &explainedErr{msg: "connection to the TP server lost: " + ExplainQUIC(ce, nil).Error(), err: ce}
	}
	return err
}

type explainedErr struct {
	msg string
	err error
}

func (e *explainedErr) Error() string { return e.msg }
func (e *explainedErr) Unwrap() error { return e.err }

// ExplainQUIC turns quic-go's errors into sentences from the client's view;
// expiredAdvice, when not nil, says what to do about an expired certificate
// (Client.ExpiredAdvice: renewal, or enrolling again without the device key).
func ExplainQUIC(err error, expiredAdvice func() string) error {
	var ae *quic.ApplicationError
	var te *quic.TransportError
	var ce *wire.QUICConnError
	switch {
	case errors.As(err, &ce):
		return ExplainQUIC(ce.Err, expiredAdvice)
	case errors.As(err, &ae) && ae.Remote && ae.ErrorCode == wire.QUICShutdown:
		return fmt.Errorf("the TP server is shutting down or restarting (%w)", err)
	case errors.As(err, &ae) && ae.Remote && ae.ErrorCode == wire.QUICCertExpired:
		advice := (*Client)(nil).expiredAdvice()
		if expiredAdvice != nil {
			advice = expiredAdvice()
		}
		return fmt.Errorf("the client certificate expired; %s (%w)", advice, err)
	case errors.As(err, &ae) && ae.Remote && ae.ErrorCode == wire.QUICRefused:
		return fmt.Errorf("the TP server is busy and refused the connection; try again (%w)", err)
	case errors.As(err, &te) && te.ErrorCode.IsCryptoError() && te.Remote:
		return &RejectedError{Err: err}
	case errors.As(err, new(*ClientCertError)):
		// This side ended the handshake: it had no certificate to show
		// (clients.Client.Dialer's GetClientCertificate), not the server's refusal.
		var ce *ClientCertError
		errors.As(err, &ce)
		return &explainedErr{msg: ce.Error(), err: err}
	case errors.As(err, &ae) && ae.Remote:
		// tpd closes a connection with a reason of its own words ("too many
		// requests cancelled before their answer"); quic-go would say
		// "Application error 0x1 (remote): …".
		reason := ae.ErrorMessage
		if reason == "" {
			reason = "it gave no reason"
		}
		return &explainedErr{msg: fmt.Sprintf("the TP server closed the connection: %s (QUIC code %#x)", reason, uint64(ae.ErrorCode)), err: err}
	case errors.As(err, &ae):
		return &explainedErr{msg: "this client closed the connection", err: err}
	case errors.As(err, new(*quic.IdleTimeoutError)):
		return &explainedErr{msg: "the TP server stopped answering (network down, or the server is gone)", err: err}
	case errors.As(err, new(*quic.StatelessResetError)):
		return &explainedErr{msg: "the TP server no longer knows this connection; it probably restarted", err: err}
	case errors.As(err, new(*quic.HandshakeTimeoutError)):
		return fmt.Errorf("no QUIC answer from the TP server (is UDP blocked on this network? --transport tls avoids QUIC): %w", err)
	}
	if code, ok := wire.StreamResetCode(err); ok && code == wire.QUICRefused {
		return fmt.Errorf("the TP server is at its limit of concurrent requests and refused this one; try again: %w", err)
	}
	return err
}

// Maintain keeps the Client's QUIC connection up for long-running users such as
// `tp forward`: when the connection is lost it reports why through logf and
// reconnects with capped, jittered exponential backoff (0.5s doubling to 30s),
// reporting each failure, until ctx ends. Dials do not wait for it: a dial during
// an outage tries to connect by itself.
func (cl *Client) Maintain(ctx context.Context, logf func(format string, args ...any)) {
	q := &cl.quic
	for {
		q.mu.Lock()
		conn, changed := q.conn, q.changed
		if changed == nil {
			changed = make(chan struct{})
			q.changed = changed
		}
		q.mu.Unlock()
		if conn == nil {
			select { // not connected yet (or TLS is in use): wait for a connection
			case <-changed:
				continue
			case <-ctx.Done():
				return
			}
		}
		select {
		case <-conn.Context().Done():
		case <-changed:
			continue
		case <-ctx.Done():
			return
		}
		if ctx.Err() != nil {
			return
		}
		logf("tp: lost the QUIC connection to %s: %v; reconnecting", cl.quicAddr(), ExplainQUIC(context.Cause(conn.Context()), cl.expiredAdvice))
		backoff := 500 * time.Millisecond
		for {
			timeout := cl.Timeout
			if timeout <= 0 {
				timeout = DefaultTimeout
			}
			cctx, cancel := context.WithTimeout(ctx, timeout)
			_, err := cl.quicConn(cctx)
			cancel()
			if ctx.Err() != nil {
				return
			}
			if err == nil {
				logf("tp: reconnected to %s over QUIC", cl.quicAddr())
				break
			}
			if errors.Is(err, ErrClosed) {
				return
			}
			wait := backoff/2 + rand.N(backoff) // jitter: 0.5–1.5 × backoff
			// One sentence with the most telling cause; every attempt's own
			// error (a carrier each, in auto) goes to the debug log.
			cl.logger().Debug("tp: reconnecting failed", "server", cl.quicAddr(), "err", err.Error())
			logf("tp: %s", RetryLine(cl.Unreachable(err), wait.Round(100*time.Millisecond)))
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				return
			}
			backoff = min(2*backoff, 30*time.Second)
		}
	}
}

// dropTracer is the QUIC tracer that counts discarded DATAGRAM frames, when the
// Client carries UDP flows (CountDatagramDrops); nil otherwise, since quic-go
// then builds an event for every packet (about 8% of QUIC throughput).
func (cl *Client) dropTracer() func(context.Context, bool, quic.ConnectionID) qlogwriter.Trace {
	if !cl.CountDatagramDrops {
		return nil
	}
	return cl.quic.drops.Tracer
}

// QUICDatagramsDropped is how many DATAGRAM frames from the server this Client's
// QUIC connections discarded because their receive queue was full (a flood
// faster than the flows read): counted, so that no datagram vanishes unsaid.
func (cl *Client) QUICDatagramsDropped() int64 { return cl.quic.drops.Dropped() }

// NewStream is a request stream on conn that says a broken connection from
// the client's point of view (an agent's control and session streams, which
// are not the Client's own requests).
func NewStream(conn *quic.Conn, str *quic.Stream) *ClientStream {
	return &ClientStream{QUICStream: wire.NewQUICStream(conn, str)}
}

// ClientCertError is a handshake this device ended because it had no
// certificate to show (an expired one it cannot renew): the server refused
// nothing, and the error's own words say what to do.
type ClientCertError struct{ Err error }

func (e *ClientCertError) Error() string { return e.Err.Error() }
func (e *ClientCertError) Unwrap() error { return e.Err }

// Explained is err said as msg: msg is what a person reads, err stays in the
// chain for errors.Is and errors.As.
func Explained(msg string, err error) error { return &explainedErr{msg: msg, err: err} }
