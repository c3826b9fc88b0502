package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// DefaultTimeout bounds a Client's setup when Client.Timeout is zero.
const DefaultTimeout = 30 * time.Second

// CarrierAuto starts on UDP and moves to tls, then ws, when UDP gets no answer
// at connect or stops delivering later (switch.go).
const CarrierAuto = "auto"

// Client is a device's way to one TP server: it hands each request a stream
// (RoundTrip) on a QUIC connection it keeps (more when the server allows no
// more streams on it), on a tp-mux/1 connection, or on a TLS connection of the
// request's own, and holds what that takes: the QUIC connections and their
// socket or carrier, the spare TLS connections, the tp-mux pool, what it
// learnt of the server. Package clients' Dialer makes one from its fields at
// first use; the fields mean what the Client's of the same name mean, and must
// not change after first use. A Client must not be copied after first use;
// Close releases it.
type Client struct {
	Server, QUICServer string
	TLSConfig          *tls.Config
	Timeout            time.Duration
	Transport          string
	Carrier            string
	CarrierHeadStart   time.Duration
	UDPReprobe         time.Duration
	CarrierProxy       func(target *url.URL) (*url.URL, error)
	CarrierHTTPURL     string
	FallbackCarriers   []string
	CarrierStall       time.Duration
	Logf               func(format string, args ...any)
	Cache              *Cache
	HeadStart          time.Duration
	KeepAlive          time.Duration
	IdleTimeout        time.Duration
	CountDatagramDrops bool
	NoTLSMux           bool
	Spares             int
	MaxQUICConns       int
	DiscoveryURL       string
	Logger             *slog.Logger
	// ExpiredAdvice, when set, says what to do about an expired client
	// certificate (renewal, or enrolling again when the device key is
	// missing); nil says that tp renews it.
	ExpiredAdvice func() string

	quic        quicState
	disco       discoveryState
	spare       spareTLS
	tlsSessions TLSSessions // the TLS connections to the server, a bounded number at a time
	tlsMux      MuxPool     // tp-mux/1 connections to the server
}

// expiredAdvice is ExpiredAdvice, or its default.
func (cl *Client) expiredAdvice() string {
	if cl != nil && cl.ExpiredAdvice != nil {
		return cl.ExpiredAdvice()
	}
	return DefaultExpiredAdvice
}

// DefaultExpiredAdvice is what to do about an expired certificate when the
// device key is there to renew it.
const DefaultExpiredAdvice = "tp renews it on the next connection, or run dlogin"

// RunOnQUIC runs t once on a new stream of the Client's QUIC connections
// (connecting one when none is live), with no retry: the request that found
// its connection gone (ConnLost) goes again on a fresh one.
func (cl *Client) RunOnQUIC(ctx context.Context, t Trip) (net.Conn, error) {
	c, _, err := cl.onQUIC(ctx, t)
	return c, err
}

// ConnLost reports whether err, the failure of a request on conn, means conn
// itself is gone; the Client then forgets it, so that no request is handed
// conn again.
func (cl *Client) ConnLost(conn *quic.Conn, err error) bool { return cl.connLost(conn, err) }

// Answered is told that a request run on a TLS connection of its own, which
// sent its first bytes early (Stream.Early), got its answer: the next spare is
// made now, not while the request's own setup competed for the CPU.
func (cl *Client) Answered() { cl.refillSpare() }

// LiveStream opens a stream on a connection the Client already holds: the
// live QUIC connection, else a usable tp-mux connection; nil when it holds
// none (a question to the server then needs a connection of its own,
// ConnectTLS).
func (cl *Client) LiveStream(ctx context.Context, what string) wire.Stream {
	if cl.LiveQUIC() != nil {
		if _, st, err := cl.openStream(ctx, what); err == nil {
			return st
		}
	}
	if m := cl.tlsMux.Usable(); m != nil {
		if st, err := m.Open(nil); err == nil {
			return st
		}
	}
	return nil
}

// TLSMuxStats says how many tp-mux connections this Client opened and how
// many requests went as streams of one.
func (cl *Client) TLSMuxStats() (conns, streams int) { return cl.tlsMux.Stats() }

// ConnectTLS opens a new TLS connection to the server (TCP connect and handshake).
func (cl *Client) ConnectTLS(ctx context.Context) (*tls.Conn, error) {
	cfg, err := cl.sessionConfig()
	if err != nil {
		return nil, err
	}
	return cl.ConnectTLSWith(ctx, cfg, nil)
}

// ServerAddr is the server's host:port (MuxClient).
func (cl *Client) ServerAddr() string { return cl.Server }

// SessionConfig is tlsConfig made once for all of the Client's TLS sessions
// (MuxClient).
func (cl *Client) SessionConfig() (*tls.Config, error) { return cl.sessionConfig() }

// ConnectTLSWith opens a TLS connection to the server with cfg; wrap, when
// not nil, wraps the TCP connection below the TLS one (MuxClient).
func (cl *Client) ConnectTLSWith(ctx context.Context, cfg *tls.Config, wrap func(net.Conn) net.Conn) (*tls.Conn, error) {
	return cl.tlsSessions.Connect(ctx, cl.Server, cfg, wrap)
}

// CertExpiry is when the Client's fixed client certificate ends a
// connection, and the sentence that says so (MuxClient).
func (cl *Client) CertExpiry() (time.Time, string, bool) {
	na, ok := cl.certNotAfter()
	if !ok {
		return time.Time{}, "", false
	}
	return na, "the client certificate expired at " + na.UTC().Format(time.RFC3339) + "; " + cl.expiredAdvice(), true
}

// certNotAfter is the expiry of the Client's fixed client certificate, if it has one.
func (cl *Client) certNotAfter() (time.Time, bool) {
	if cl.TLSConfig == nil || len(cl.TLSConfig.Certificates) == 0 || cl.TLSConfig.Certificates[0].Leaf == nil {
		return time.Time{}, false
	}
	return cl.TLSConfig.Certificates[0].Leaf.NotAfter, true
}

// forgetRejected drops the session ticket for the server when err says the
// server refused this device's certificate, and returns err (ForgetRejected).
func (cl *Client) forgetRejected(err error) error {
	return ForgetRejected(err, cl.Server, cl.TLSConfig)
}

// sessionConfig is tlsConfig made once for all of the Client's TLS sessions
// (again if TLSConfig or Server changed).
func (cl *Client) sessionConfig() (*tls.Config, error) {
	return cl.tlsSessions.SessionConfig(cl.Server, cl.TLSConfig)
}

func (cl *Client) tlsConfig() (*tls.Config, error) {
	return Config(cl.Server, cl.TLSConfig)
}

// carrierDialer returns how to open links of the named carrier.
func (cl *Client) carrierDialer(kind string) (func(context.Context) (CarrierLink, error), error) {
	if _, err := cl.carrierLinks().Dial(kind); err != nil {
		return nil, err
	}
	return func(ctx context.Context) (CarrierLink, error) {
		dial, _ := cl.carrierLinks().Dial(kind)
		return dial(ctx)
	}, nil
}

// carrierLinks opens the stream carriers' links to the Client's server.
func (cl *Client) carrierLinks() CarrierDialer {
	return CarrierDialer{Server: cl.Server, TLSConfig: cl.TLSConfig, Proxy: cl.CarrierProxy, HTTPURL: cl.CarrierHTTPURL}
}

// carrier is the Client's first carrier, "udp" when unset or auto.
func (cl *Client) carrier() string {
	if cl.Carrier == "" || cl.Carrier == CarrierAuto {
		return wire.CarrierUDP
	}
	return cl.Carrier
}

// Mode is the transport requests use: a stream carrier (or auto, which falls
// back to one) carries QUIC, so it forces "quic".
func (cl *Client) Mode() string {
	if cl.Carrier != "" && cl.Carrier != wire.CarrierUDP {
		return QUIC
	}
	return cl.Transport
}

// Unreachable makes err, the failure of a connection to the server, an
// *UnreachableError; nil, a closed Client and an error already made one stay
// as they are.
func (cl *Client) Unreachable(err error) error {
	if err == nil || errors.Is(err, ErrClosed) || errors.As(err, new(*UnreachableError)) {
		return err
	}
	timeout := cl.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if ce := (*ClientCertError)(nil); errors.As(err, &ce) {
		// No attempt got as far as the server's answer: this device had no
		// certificate to show, which its own error explains.
		return &UnreachableError{Server: cl.Server, Cause: "this device has no certificate to show it: " + ce.Error(), Err: err}
	}
	udpOnly := cl.Mode() == QUIC && (cl.Carrier == "" || cl.Carrier == wire.CarrierUDP) && len(cl.FallbackCarriers) == 0
	return &UnreachableError{Server: cl.Server, Cause: ReachCause(err, timeout, udpOnly, cl.expiredAdvice()), Err: err}
}

// RetryLine is what a long-running client says when it could not connect to
// the server and tries again after wait: one sentence, the cause first.
func RetryLine(err error, wait time.Duration) string {
	msg := err.Error()
	if !strings.HasSuffix(msg, "?") && !strings.HasSuffix(msg, ".") {
		msg += "."
	}
	return fmt.Sprintf("%s Next attempt in %s.", msg, wait)
}

func (cl *Client) logger() *slog.Logger {
	if cl.Logger != nil {
		return cl.Logger
	}
	return discardLog
}

var discardLog = slog.New(slog.DiscardHandler)

// Every request to the TP server (a TCP dial, a UDP flow, an agent's pick-up
// of a session) goes through the transport in one call, Client.RoundTrip. The
// transport picks the way to the server (a stream of a QUIC connection, a
// stream of a tp-mux connection, a TLS connection of its own), hands the
// request a stream on it, and runs the request again on another way when its
// failure says that nothing of it can have reached a service. The request
// (the hello exchange, early bytes, an end-to-end attach, the answer) does
// not choose a transport and does not retry: it is the caller's (package
// clients).

// Stream is one request's way to the server, handed out by the transport.
type Stream struct {
	// Stream is the QUIC stream or the TLS connection; on tp-mux it is nil
	// until OpenMux.
	wire.Stream
	// QUIC is the QUIC connection the stream is on (its answers say whether
	// early bytes may go on it); nil over TLS.
	QUIC *quic.Conn
	// Mux, when set, is the tp-mux connection the request's stream is opened
	// on, together with the request's first bytes (OpenMux).
	Mux *mux.Conn
	// Open: a TLS connection known to be open (a new one, or a spare the
	// server has not closed), on which first bytes may go before the answer.
	Open bool
	// Learn: the answer to a TCP dial on this stream says what the
	// destination thinks of early bytes.
	Learn bool

	// Set by the request, read by the transport.
	//
	// Early: the request sent its first bytes without waiting for the answer;
	// it is not run again, and the spares are refilled once the answer is in
	// (Client.Answered).
	Early bool
	// Refused: the tp-mux stream failed before anything of the request can
	// have reached a destination.
	Refused bool

	pool *MuxPool
}

// OpenMux opens the request's stream on the tp-mux connection with first, the
// request's first bytes, in the stream's opening.
func (s *Stream) OpenMux(first []byte) (*mux.Stream, error) {
	st, err := s.Mux.Open(first)
	if err != nil {
		return nil, err
	}
	s.pool.Counted()
	s.Stream = st
	return st, nil
}

// TripKind is what a request is, for the transport's rules.
type TripKind int

const (
	TripDial   TripKind = iota // a TCP dial
	TripUDP                    // a UDP flow
	TripAccept                 // an agent's pick-up of a session, over TLS
)

// Trip is one request for RoundTrip.
type Trip struct {
	Kind TripKind
	// What names the request in the errors of opening its stream.
	What string
	// Retry is the request's own rules for running it again; nil: it may go
	// again on a new connection after its connection was lost, and not after
	// a spare failed.
	Retry Retry
	// Run runs the request on s and returns the connection the caller gets.
	// It closes s on failure.
	Run func(ctx context.Context, s *Stream) (net.Conn, error)
}

// Retry is what a request says of running it again after it failed with err.
type Retry interface {
	// Resend says whether the request, which failed with err on a connection
	// that turned out to be gone, may go again on another: not once its first
	// bytes may have reached a service.
	Resend(err error) bool
	// RetryOnNew says whether the request, which failed with err on a spare
	// TLS connection, goes again on a new one: when the failure says nothing
	// about the request (the server closed the idle connection, or answered
	// hello_timeout).
	RetryOnNew(err error) bool
}

func (t Trip) resend(err error) bool { return t.Retry == nil || t.Retry.Resend(err) }

func (t Trip) retryOnNew(err error) bool { return t.Retry != nil && t.Retry.RetryOnNew(err) }

// RoundTrip runs t on a stream of the transport that the Client's Transport
// and Carrier, and what it learnt of the server, pick; it runs t again on
// another way when t's failure says that nothing of it can have reached a
// service (Trip.Retry).
func (cl *Client) RoundTrip(ctx context.Context, t Trip) (net.Conn, error) {
	mode := cl.Mode()
	if t.Kind == TripAccept {
		mode = TLS // the agent was told of the session on a TLS control connection
	}
	switch mode {
	case Auto, "":
		return cl.tripAuto(ctx, t)
	case QUIC:
		return cl.tripQUIC(ctx, t)
	case TLS:
		return cl.tripTLS(ctx, t)
	default:
		return nil, fmt.Errorf("transport %q must be auto, quic or tls", cl.Transport)
	}
}

// tripAuto uses a live QUIC connection when there is one, TLS when QUIC
// failed recently for this server (AutoSkipsQUIC), and otherwise races the
// two (race) and remembers the winner.
func (cl *Client) tripAuto(ctx context.Context, t Trip) (net.Conn, error) {
	if cl.LiveQUIC() != nil {
		if c, conn, err := cl.onQUIC(ctx, t); conn != nil && !cl.quicAgain(conn, err, t) {
			return c, err
		}
	}
	if cl.AutoSkipsQUIC(ctx) {
		return cl.tripTLS(ctx, t)
	}
	winner, tconn, err := cl.race(ctx)
	if err != nil {
		return nil, err
	}
	// A fallback to TLS is remembered for less long: UDP, or a carrier, may
	// get through again.
	cl.RememberTransport(winner)
	if winner == TLS {
		return t.Run(ctx, &Stream{Stream: tconn})
	}
	return cl.tripQUIC(ctx, t)
}

// tripQUIC runs t on a new stream of the Client's QUIC connections. If the
// connection turns out to be dead (the server restarted), it runs t once more
// on a fresh one.
func (cl *Client) tripQUIC(ctx context.Context, t Trip) (net.Conn, error) {
	c, conn, err := cl.onQUIC(ctx, t)
	if conn != nil && cl.quicAgain(conn, err, t) && ctx.Err() == nil {
		c, conn, err = cl.onQUIC(ctx, t) // the connection died under us: once on a fresh one
	}
	if conn == nil && err != nil && !errors.Is(ctx.Err(), context.Canceled) && (cl.Carrier == "" || cl.Carrier == wire.CarrierUDP) {
		// No connection to the server over UDP: one sentence with the telling
		// cause, as auto's race says it (a handshake nobody answered ends in
		// quic-go's idle timeout, which ExplainQUIC reads as a server that
		// stopped answering). A stream carrier's error names the carrier.
		return nil, cl.Unreachable(err)
	}
	return c, err
}

// onQUIC runs t on a new stream of the Client's QUIC connections
// (openStream); it returns the connection it used, also with an error (for
// connLost), unless connecting failed.
func (cl *Client) onQUIC(ctx context.Context, t Trip) (net.Conn, *quic.Conn, error) {
	conn, st, err := cl.openStream(ctx, t.What)
	if err != nil {
		return nil, conn, err
	}
	// The hello goes out at once: the server sees a stream only once it carries data.
	c, err := t.Run(ctx, &Stream{Stream: st, QUIC: conn, Learn: true})
	return c, conn, err
}

// quicAgain says whether t, which failed with err on conn, goes again on a
// fresh connection: conn is gone (connLost, which forgets it) and nothing of
// the request can have reached a service (mayResend).
func (cl *Client) quicAgain(conn *quic.Conn, err error, t Trip) bool {
	return cl.connLost(conn, err) && t.resend(err)
}

// tripTLS runs t over TLS: a TCP dial or a UDP flow as a stream of a tp-mux
// connection (MuxPool); an older server's first request on the connection
// that found it out; then a flow on a new TLS connection, a dial or an
// accept on a new session's TLS connection, a spare when there is one
// (spare.go). A failure on a spare that says nothing about the request (the
// server closed the idle connection, or answered hello_timeout because it
// waited longer than its hello timeout) is run once more on a new connection.
func (cl *Client) tripTLS(ctx context.Context, t Trip) (net.Conn, error) {
	if !cl.NoTLSMux && t.Kind != TripAccept {
		c, handled, plain, err := cl.tripMux(ctx, t)
		if handled {
			return c, err
		}
		if plain != nil {
			return t.Run(ctx, &Stream{Stream: plain, Learn: true})
		}
	}
	if t.Kind == TripUDP {
		// An older server, the tp-mux connections full or refusing, or
		// --no-tls-mux: a connection of its own.
		conn, err := cl.ConnectTLS(ctx)
		if err != nil {
			return nil, err
		}
		return t.Run(ctx, &Stream{Stream: conn})
	}
	conn, spare, open, err := cl.sessionTLS(ctx)
	if err != nil {
		return nil, err
	}
	s := &Stream{Stream: conn, Open: open, Learn: true}
	c, err := t.Run(ctx, s)
	if s.Early {
		// The next spare is made once the answer is in (earlyTunnel.wait):
		// made now, its handshake would compete for the CPU with this
		// session's own setup at the server.
		return c, err
	}
	if spare && ctx.Err() == nil && t.retryOnNew(err) {
		if conn, err = cl.ConnectTLS(ctx); err != nil {
			return nil, err
		}
		// The second attempt waits for the answer before its first bytes.
		c, err = t.Run(ctx, &Stream{Stream: conn, Learn: true})
	}
	if t.Kind != TripAccept {
		// (An agent refills after an accept once its session has its first
		// answer, Agent.acceptTLS, so that the handshake does not compete with
		// the session's own setup for the CPU.)
		cl.refillSpare()
	}
	return c, err
}

// tripMux runs t as a stream of a tp-mux connection. A dial whose stream was
// refused before anything of it can have reached a destination goes again,
// up to 3 times, on a connection that takes it; a flow goes on a connection
// of its own (handled false). handled is also false when the server does not
// speak tp-mux/1: plain is then a new tp/1 connection for the request, or nil.
func (cl *Client) tripMux(ctx context.Context, t Trip) (c net.Conn, handled bool, plain *tls.Conn, err error) {
	for attempt := 0; ; attempt++ {
		m, plain, err := cl.tlsMux.Conn(ctx, cl)
		if err != nil || m == nil {
			return nil, err != nil, plain, err
		}
		s := &Stream{Mux: m, pool: &cl.tlsMux, Learn: true}
		c, err := t.Run(ctx, s)
		if t.Kind == TripUDP {
			if s.Refused || err != nil && errors.Is(err, mux.ErrRefused) && ctx.Err() == nil {
				// The server refused the stream unserved (it drains): on a
				// connection of its own.
				return nil, false, nil, nil
			}
		} else if s.Refused && attempt < 3 && ctx.Err() == nil {
			continue // nothing of the request reached a destination: on another connection
		}
		return c, true, nil, err
	}
}

// race connects over QUIC and, after the head start or as soon as QUIC fails,
// over TLS; the first to complete wins and the other attempt is abandoned. On a
// TLS win it returns the TLS connection; on a QUIC win the shared connection is set.
func (cl *Client) race(ctx context.Context) (string, *tls.Conn, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		transport string
		conn      *tls.Conn
		err       error
	}
	results := make(chan result, 2)
	go func() {
		_, err := cl.quicConn(ctx)
		results <- result{transport: QUIC, err: err}
	}()
	head := cl.HeadStart
	if head <= 0 {
		head = DefaultHeadStart
	}
	var headStartOver <-chan time.Time
	if cl.racesCarriers() {
		// QUIC over a stream carrier keeps QUIC's features (streams without
		// head-of-line blocking between them, UDP flows, moving between
		// networks and carriers): plain TLS starts only when QUIC got through
		// on no carrier.
	} else if cl.quic.headStartTimer != nil {
		headStartOver = cl.quic.headStartTimer(head)
	} else {
		timer := time.NewTimer(head)
		defer timer.Stop()
		headStartOver = timer.C
	}
	startTLS := func() {
		go func() {
			c, err := cl.ConnectTLS(ctx)
			results <- result{transport: TLS, conn: c, err: err}
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
			if r.transport == TLS && pending > 0 {
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

// AutoSkipsQUIC reports whether transport auto goes straight to TP's plain
// TLS transport: it won a race recently (in this process, or remembered for
// this server and network), or the server's discovery document offers no
// QUIC.
func (cl *Client) AutoSkipsQUIC(ctx context.Context) bool {
	cl.quic.mu.Lock()
	tlsWon := time.Now().Before(cl.quic.tlsUntil)
	cl.quic.mu.Unlock()
	return tlsWon || cl.Cache != nil && cl.Cache.Get(cl.Server) == TLS || cl.quicNotOffered(ctx)
}

// RememberTransport remembers that transport (QUIC or
// TLS) won auto's choice for the server on this network; TLS, a
// fallback, for DefaultFallbackTTL only, after which QUIC is tried again.
func (cl *Client) RememberTransport(transport string) {
	if transport == TLS {
		cl.quic.mu.Lock()
		cl.quic.tlsUntil = time.Now().Add(DefaultFallbackTTL)
		cl.quic.mu.Unlock()
	}
	if cl.Cache == nil {
		return
	}
	ttl := time.Duration(0)
	if transport == TLS {
		ttl = DefaultFallbackTTL
	}
	_ = cl.Cache.PutFor(cl.Server, transport, ttl) // a cache that cannot be written only costs races
}

// quicGrace is how long auto still waits for QUIC after TLS failed.
const quicGrace = time.Second

// What a Client holds, for monitoring and for tests that watch it.

// PacketConn is the socket or carrier link the shared QUIC connection runs
// on (a *net.UDPConn or the *udpgro.Conn around one, a *CarrierConn or a
// *MovingConn); nil before the first QUIC connect.
func (cl *Client) PacketConn() net.PacketConn {
	cl.quic.mu.Lock()
	defer cl.quic.mu.Unlock()
	return cl.quic.udp
}

// MuxPool is the Client's tp-mux/1 connections (its timers may be set before
// first use).
func (cl *Client) MuxPool() *MuxPool { return &cl.tlsMux }

// TLSSessions is what opens the Client's TLS connections (Started counts them).
func (cl *Client) TLSSessions() *TLSSessions { return &cl.tlsSessions }
