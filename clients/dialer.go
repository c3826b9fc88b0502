package clients

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Dialer opens connections through a TP server: a new QUIC stream on one shared
// QUIC connection (more connections when the server allows no more streams on
// it), or a new TLS connection, per dial (see Transport); ALPN "tp/1",
// a client hello naming the destination, and raw bytes after an ok. Its fields
// are read at first use (a change after that is not seen), and it must not be
// copied after first use; Close releases its connections.
type Dialer struct {
	// Server is the TP server's host:port.
	Server string
	// TLSConfig carries RootCAs and the client certificate (Certificates or
	// GetClientCertificate). The Dialer forces NextProtos ["tp/1"] and TLS 1.3, and
	// sets ServerName from Server when empty.
	TLSConfig *tls.Config
	// Timeout bounds the whole setup: TCP connect, handshake and hello exchange.
	// Zero means DefaultDialTimeout. It does not limit the connection once established.
	Timeout time.Duration

	// Transport is TransportAuto (the default when empty), TransportQUIC or TransportTLS.
	Transport string
	// QUICServer is the server's UDP host:port; empty means Server (same port).
	QUICServer string
	// Carrier is what carries the QUIC connection (package transport): "udp", "tls"
	// (a TLS stream on Server's TCP port), "ws" (a WebSocket on Server's
	// website side), "http" (HTTPS polling) or "auto" (UDP raced against the
	// others, and a live connection that moves between them,
	// transport/race.go). Empty means "udp" with Transport "quic" or "tls", and
	// with Transport auto a race like "auto"'s whose UDP side keeps quic-go's
	// batched UDP I/O and so cannot move off UDP mid-connection. Any but "udp"
	// implies Transport "quic": every request is a stream of the one QUIC
	// connection.
	Carrier string
	// CarrierHeadStart is how long the race gives UDP alone before it also
	// tries the stream carriers; zero means DefaultCarrierHeadStart.
	CarrierHeadStart time.Duration
	// UDPReprobe is how often a connection on a stream carrier checks with a
	// QUIC handshake whether UDP gets through again, and moves back to UDP if
	// it does; zero means DefaultUDPReprobe.
	UDPReprobe time.Duration
	// CarrierProxy, when set, replaces HTTPS_PROXY/https_proxy and NO_PROXY as
	// the HTTP proxy the tls and ws carriers connect through (CONNECT); it
	// returns nil for a direct connection. Environment proxies are never used
	// for loopback addresses; tests that need one set this.
	CarrierProxy func(target *url.URL) (*url.URL, error)
	// CarrierHTTPURL, when set, is the http carrier's endpoint instead of
	// https://Server/.well-known/tp-carrier/http: a CDN or reverse proxy that
	// forwards POSTs there.
	CarrierHTTPURL string
	// FallbackCarriers are the carriers the live QUIC connection moves to, in
	// order, when its carrier stops delivering (transport/switch.go): packets go
	// out and nothing comes back for CarrierStall (zero: DefaultCarrierStall).
	// Empty: the connection stays on its carrier.
	FallbackCarriers []string
	CarrierStall     time.Duration
	// Logf, when set, is told when the connection moves to another carrier.
	Logf func(format string, args ...any)
	// Cache remembers per server and network which transport and carrier won
	// an auto race; nil remembers only for the Dialer's lifetime.
	Cache *TransportCache
	// HeadStart is how long auto waits for QUIC before also trying TLS.
	// Zero means DefaultHeadStart.
	HeadStart time.Duration
	// KeepAlive is the QUIC keepalive period (keeps NAT bindings open); zero means
	// 15s, negative disables. IdleTimeout ends a QUIC connection that heard nothing
	// for that long; zero means 60s. An Agent's own QUIC connection uses
	// Agent.IdleTimeout instead.
	KeepAlive, IdleTimeout time.Duration
	// CountDatagramDrops counts the DATAGRAM frames that the QUIC connection's
	// receive queue discards (QUICDatagramsDropped): set it where the Dialer
	// carries UDP flows. It costs about 8% of QUIC throughput, so it is off for
	// byte streams alone.
	CountDatagramDrops bool
	// NoE2EAttach makes every session to a protected reverse name run a full
	// end-to-end TLS handshake (tp-e2e/1) instead of attaching to the state kept
	// from an earlier one (docs/PROTOCOL.md, section 11.4).
	NoE2EAttach bool
	// NoE2EMux makes every TCP session to a protected reverse name a dial of
	// its own through the server, instead of a stream of the end-to-end carrier
	// the Dialer keeps to the name (docs/PROTOCOL.md, section 11.4.1).
	NoE2EMux bool
	// Direct makes TCP sessions to a protected reverse name streams of one
	// end-to-end QUIC connection with its agent, which starts relayed through
	// the server and moves to a direct path between the two devices when ICE
	// finds one (docs/PROTOCOL.md, section 11.4.2). An agent that takes none
	// gets ordinary sessions for a while.
	Direct bool
	// DirectLoopback also offers loopback addresses as ICE candidates, and
	// DirectInterfaces, when set, says which interfaces give candidates (tests
	// on one host keep ICE on loopback with both). An Agent uses its Dialer's.
	DirectLoopback   bool
	DirectInterfaces func(name string) bool
	// NoTLSMux makes every dial over TLS a TLS connection of its own (ALPN
	// tp/1) instead of a stream of a tp-mux/1 connection the Dialer holds to
	// the server (transport.MuxPool, docs/PROTOCOL.md section 9.9).
	NoTLSMux bool
	// Spares is how many handshaken TLS connections the Dialer keeps ready
	// while sessions come close together over TLS (transport/spare.go); zero means one,
	// at most 8. An agent keeps DefaultAgentSpares.
	Spares int
	// MaxQUICConns bounds the QUIC connections the Dialer holds to the server: when
	// every stream the server allows on the shared connection is in use, a request
	// goes to a further connection (closed again once idle) instead of waiting.
	// Zero means DefaultMaxQUICConns.
	MaxQUICConns int
	// DiscoveryURL is where auto fetches the server's transport discovery
	// document the first time it meets the server (transport/client_discovery.go); empty means
	// https://Server/.well-known/tp.
	DiscoveryURL string
	// Logger receives debug lines (a discovery document that could not be
	// had); nil discards them.
	Logger *slog.Logger

	// The way to the server: QUIC connections, spares, tp-mux connections,
	// carriers (package transport), made from the fields above at first use.
	tcOnce sync.Once
	tc     *transport.Client
	// Where a dial may send its first bytes with its hello (early.go): over
	// QUIC (quicEarly, about the live QUIC connection) and over TLS.
	quicEarly earlyState
	tlsEarly  earlyState
	e2e       attachStates // end-to-end attach state by reverse name (e2eattach.go)
	mux       muxStates    // end-to-end carriers by reverse name (e2emux_dial.go)
	direct    directStates // end-to-end QUIC pairs by reverse name (direct_dial.go)

	// Set by Client.Dialer, for CutError: this device's ID (user@device),
	// named in messages, and Client.WhyRejected, which asks the server why it
	// refused this device's certificate.
	device      string
	whyRejected func(context.Context, error) error
	// renewable, set by Client.Dialer, says why an expired certificate cannot
	// be renewed (the device key is missing), or nil when it can be
	// (expiredAdvice).
	renewable func() error
}

// RefusedError is the server's refusal of a dial, or the refusal of a
// protected reverse name's agent (Agent set).
type RefusedError struct {
	Code   string // one of the proxy.Code* constants, or CodeAgentDenied
	Reason string // written by the server (or the agent) for a person
	// Agent is the reverse name whose agent refused, inside the end-to-end
	// session (docs/PROTOCOL.md, section 11.4); empty for the server's refusals.
	Agent string
}

func (e *RefusedError) Error() string {
	reason := e.Reason
	if reason == "" {
		reason = "no reason given"
	}
	if e.Agent != "" {
		switch e.Code {
		case wire.CodeDialFailed:
			if strings.Contains(strings.ToLower(e.Reason), strings.ToLower(e.Agent)) {
				return e.Reason // the agent's own sentence names the service, and whose it is
			}
			return "the device that exposes " + e.Agent + " could not connect to its local service: " + reason
		case wire.CodeUnauthenticated:
			return "the agent of " + e.Agent + " did not accept this device's certificate: " + reason
		case CodeAgentDenied:
		default:
			return "refused by the agent of " + e.Agent + " (" + e.Code + "): " + reason
		}
	}
	switch e.Code {
	case wire.CodePolicyDenied:
		return "denied by policy: " + reason
	case wire.CodeUnauthenticated:
		return "the TP server did not accept the client certificate (" + reason + "); run dlogin"
	case wire.CodeResolveFailed, wire.CodeDialRefused, wire.CodeDialTimeout, wire.CodeDialFailed:
		return "the TP server could not reach the destination: " + reason
	case wire.CodePolicyError:
		return "denied: the TP server's policy could not be evaluated, so it refused to decide (" + reason + "); tell the TP administrator"
	case wire.CodeSelfDial:
		return "refused: " + reason + " (the TP server does not connect to itself through itself)"
	case wire.CodeInternal:
		return "the TP server failed internally: " + reason
	case wire.CodeReverseUnknown, wire.CodeReverseOffline, wire.CodeReverseTimeout, wire.CodeReverseBusy:
		return "the exposed service is not reachable: " + reason
	case CodeAgentDenied:
		return "refused by the exposed service's agent: " + reason
	case wire.CodeNameTaken:
		return "name taken: " + reason
	default:
		return "the TP server refused the request (" + e.Code + "): " + reason
	}
}

// Unwrap lets errors.Is(err, authz.ErrPolicyDenied) recognise policy denials.
func (e *RefusedError) Unwrap() error {
	if e.Code == wire.CodePolicyDenied || e.Code == wire.CodePolicyError {
		return authz.ErrPolicyDenied
	}
	return nil
}

// DialContext connects to addr (host:port) through the TP server. network must be
// "tcp" ("tcp4" and "tcp6" are accepted and mean the same: the server picks the
// address). The returned connection is a TLS connection, a stream of a tp-mux
// connection or a QUIC stream (a wire.Stream); each half-closes with CloseWrite. Network "udp" ("udp4", "udp6") opens a UDP flow
// instead: a *wire.UDPFlow, a net.Conn that keeps datagram boundaries (udp.go).
// A refusal by the server is a *RefusedError.
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return d.dial(ctx, network, addr, nil)
}

// dial is DialContext; early, when not nil, lets a QUIC request return before
// the server's answer (early.go).
func (d *Dialer) dial(ctx context.Context, network, addr string, early *earlyDial) (_ net.Conn, err error) {
	netw := "tcp"
	switch network {
	case "tcp", "tcp4", "tcp6":
	case "udp", "udp4", "udp6": // a UDP flow (udp.go)
		netw = "udp"
	default:
		return nil, fmt.Errorf("tp dial %s: network %q is not supported", addr, network)
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("tp dial %s: %w", addr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		if port, err = net.LookupPort(netw, portStr); err != nil {
			return nil, fmt.Errorf("tp dial %s: %w", addr, err)
		}
	}
	hello := wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: netw, Host: host, Port: port}
	if err := hello.Validate(); err != nil {
		return nil, fmt.Errorf("tp dial %s: %w", addr, err)
	}

	timeout := d.Timeout
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	if netw == "udp" {
		return d.transport().RoundTrip(ctx, d.udpTrip(addr, hello))
	}
	// A protected name this Dialer holds a pair to: a stream of it, no dial
	// through the server (direct_dial.go).
	if c, handled, claim, err := d.directDial(ctx, addr); handled {
		return c, err
	} else if claim != nil {
		dctx := context.WithValue(ctx, directClaimKey{}, claim)
		c, err := d.transport().RoundTrip(dctx, d.dialTrip(addr, hello, early))
		d.releaseDirect(claim)
		if !errors.Is(err, errNoDirect) {
			return c, err
		}
		ctx = context.WithValue(ctx, noDirectKey{}, true) // an older agent: an ordinary session
	}
	// A protected name this Dialer holds an end-to-end carrier to: a stream of
	// it, no dial through the server (e2emux_dial.go).
	if c, handled, claim, err := d.muxDial(ctx, addr, early); handled {
		return c, err
	} else if claim != nil {
		ctx = context.WithValue(ctx, muxClaimKey{}, claim)
		defer func() { d.releaseMux(claim, err) }()
	}
	return d.transport().RoundTrip(ctx, d.dialTrip(addr, hello, early))
}

// transport is the Dialer's way to the server, made from its fields at first
// use (their changes after that are not seen).
func (d *Dialer) transport() *transport.Client {
	d.tcOnce.Do(func() {
		d.tc = &transport.Client{
			Server: d.Server, QUICServer: d.QUICServer, TLSConfig: d.TLSConfig, Timeout: d.Timeout,
			Transport: d.Transport, Carrier: d.Carrier, CarrierHeadStart: d.CarrierHeadStart,
			UDPReprobe: d.UDPReprobe, CarrierProxy: d.CarrierProxy, CarrierHTTPURL: d.CarrierHTTPURL,
			FallbackCarriers: d.FallbackCarriers, CarrierStall: d.CarrierStall, Logf: d.Logf,
			Cache: d.Cache, HeadStart: d.HeadStart, KeepAlive: d.KeepAlive, IdleTimeout: d.IdleTimeout,
			CountDatagramDrops: d.CountDatagramDrops, NoTLSMux: d.NoTLSMux, Spares: d.Spares,
			MaxQUICConns: d.MaxQUICConns, DiscoveryURL: d.DiscoveryURL, Logger: d.Logger,
			ExpiredAdvice: d.expiredAdvice,
		}
	})
	return d.tc
}

// Close closes the Dialer's end-to-end carriers (e2emux_dial.go: their open
// streams are cut), then its way to the server (transport.Client.Close: the
// QUIC connections, after a "bye" when every request stream was closed, the
// spares and the tp-mux connections).
func (d *Dialer) Close() error {
	d.closeDirect()
	d.closeMux()
	return d.transport().Close()
}

// Maintain keeps the Dialer's QUIC connection up for long-running users such
// as `tp forward` (transport.Client.Maintain): when the connection is lost it
// reports why through logf and reconnects with capped, jittered exponential
// backoff, until ctx ends. Dials do not wait for it.
func (d *Dialer) Maintain(ctx context.Context, logf func(format string, args ...any)) {
	d.transport().Maintain(ctx, logf)
}

// QUICConns is how many QUIC connections the Dialer holds open to its server.
func (d *Dialer) QUICConns() int { return d.transport().QUICConns() }

// QUICDatagramsDropped is how many DATAGRAM frames from the server this
// Dialer's QUIC connections discarded because their receive queue was full.
func (d *Dialer) QUICDatagramsDropped() int64 { return d.transport().QUICDatagramsDropped() }

// CurrentCarrier is the carrier the Dialer's QUIC connection is on now.
func (d *Dialer) CurrentCarrier() string { return d.transport().CurrentCarrier() }

// TLSMuxStats says how many tp-mux connections this Dialer opened and how
// many dials went as streams of one.
func (d *Dialer) TLSMuxStats() (conns, streams int) { return d.transport().TLSMuxStats() }

// forgetRejected drops the session ticket for the server when err says the
// server refused this device's certificate, and returns err
// (transport.ForgetRejected).
func (d *Dialer) forgetRejected(err error) error {
	return transport.ForgetRejected(err, d.Server, d.TLSConfig)
}

func (e *exchangeError) Unwrap() error { return e.error }
