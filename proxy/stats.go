package proxy

import (
	"context"
	"crypto/x509"
	"errors"
	"strings"
	"sync/atomic"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/qlog"
	"github.com/quic-go/quic-go/qlogwriter"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"
)

// The server's counters for monitoring. Each event costs one atomic add in a
// fixed table, indexed by small bounded label sets: never an identity, a device,
// a destination or a name. A monitoring system reads them through Stats, at its
// own pace; the package itself knows nothing of any metrics library.

// Label values of Stats. Anything outside these sets is counted as "other".
var (
	// StatTransports: the proxy's two transports, the public ports of
	// `tp expose --public` (TCP and UDP), and browsers' WebTransport sessions.
	StatTransports = []string{"tls", "quic", "tcp", "udp", "webtransport", "websocket", "other"}
	// StatActions: a session's operation. "none" is a session refused before
	// its hello was read; web is a website connection.
	StatActions = []string{authz.ActionDial, authz.ActionDialUDP, authz.ActionListen, authz.ActionExposePublic, wire.OpAccept, "web", wire.OpWhy, "none", "other"}
	// StatOutcomes: "ok" or the code of the refusal (docs/PROTOCOL.md);
	// "refused" is a public or website connection turned away without a hello.
	StatOutcomes = []string{"ok",
		wire.CodeBadRequest, wire.CodeHelloTooLarge, wire.CodeHelloTimeout, wire.CodeUnsupportedVersion,
		wire.CodeUnknownOp, wire.CodeUnsupportedNetwork, wire.CodeUnauthenticated, wire.CodePolicyDenied,
		wire.CodeResolveFailed, wire.CodeDialRefused, wire.CodeDialTimeout, wire.CodeDialFailed, wire.CodeInternal,
		wire.CodeSelfDial, wire.CodePolicyError, wire.CodeTooManyFlows, wire.CodeNameTaken, wire.CodeReverseUnknown,
		wire.CodeReverseOffline, wire.CodeReverseTimeout, wire.CodeReverseBusy, wire.CodeUnknownSession,
		wire.CodeReverseDisabled, wire.CodePublicRefused, CodeTooManySessions, CodeTooManyNames, CodeTooManyPending, CodeE2ERequired, CodeHoldsUnavailable,
		"refused", "other"}
	// StatHandshakeReasons: why a TLS handshake on the public port failed, or a
	// connection was closed before it (per_ip_cap, max_conns).
	StatHandshakeReasons = []string{"no_cert", "expired", "unknown_ca", "revoked", "unknown_device", "unknown_name", "timeout", "per_ip_cap", "max_conns", "other"}
)

var (
	transportIndex = indexOf(StatTransports)
	actionIndex    = indexOf(StatActions)
	outcomeIndex   = indexOf(StatOutcomes)
	reasonIndex    = indexOf(StatHandshakeReasons)
)

// The sizes of the label sets; TestStatLabelSets checks them.
const (
	nTransports = 7
	nActions    = 9
	nOutcomes   = 32
	nReasons    = 10
)

func indexOf(values []string) map[string]int {
	m := make(map[string]int, len(values))
	for i, v := range values {
		m[v] = i
	}
	return m
}

// lookup is the index of v in a label set, or of its last value ("other").
func lookup(m map[string]int, v string, n int) int {
	if i, ok := m[v]; ok {
		return i
	}
	return n - 1
}

// counters is the server's fixed table of counters.
type counters struct {
	sessions   [nTransports][nActions][nOutcomes]atomic.Int64
	handshakes [nReasons]atomic.Int64
	// Proxy connections whose handshake succeeded, by transport (tls, quic).
	proxyConns         [2]atomic.Int64
	resumedConns       [2]atomic.Int64 // … of which resumed a TLS session (a ticket)
	quicStreams        atomic.Int64
	quicMigrations     atomic.Int64 // connections moved to a client's new address
	bytesUp, bytesDown atomic.Int64 // client→destination, destination→client, counted at each session's end
	peerCounters                    // sessions carried between instances (peer_stats.go)
	// Leases of reverse names in the database (proxy/reverse/leases.go).
	leases reverse.LeaseCounters
	stun   stunCounters // STUN Binding requests on the QUIC socket (stun.go)
}

func (c *counters) session(transport, action, outcome string, up, down int64) {
	if action == "" {
		action = "none"
	}
	if outcome == "" {
		outcome = "ok"
	}
	// Bytes first: a reader that sees the session counted sees its bytes too.
	if up > 0 {
		c.bytesUp.Add(up)
	}
	if down > 0 {
		c.bytesDown.Add(down)
	}
	t := lookup(transportIndex, transport, nTransports)
	c.sessions[t][lookup(actionIndex, action, nActions)][lookup(outcomeIndex, outcome, nOutcomes)].Add(1)
}

func (c *counters) handshakeFailed(reason string) {
	c.handshakes[lookup(reasonIndex, reason, nReasons)].Add(1)
}

// handshakeReason classifies a failed TLS handshake for StatHandshakeReasons.
func handshakeReason(err error, timedOut bool) string {
	var inv x509.CertificateInvalidError
	var ua x509.UnknownAuthorityError
	msg := err.Error()
	switch {
	case timedOut:
		return "timeout"
	case errors.Is(err, authz.ErrRevoked):
		return "revoked"
	case errors.Is(err, authz.ErrUnknownDevice):
		return "unknown_device"
	case errors.As(err, &inv) && inv.Reason == x509.Expired, strings.Contains(msg, "certificate expired"):
		return "expired"
	case errors.As(err, &ua), strings.Contains(msg, "not issued by this TP server"), strings.Contains(msg, "not by this TP server's issuing CA"):
		return "unknown_ca"
	case strings.Contains(msg, "didn't provide a certificate"), strings.Contains(msg, "no client certificate"), strings.Contains(msg, "client certificate required"):
		return "no_cert"
	case strings.Contains(msg, "no certificates configured"): // s.unknownName
		return "unknown_name"
	}
	return "other"
}

// SessionCount is how many sessions ended with one transport, action and outcome.
type SessionCount struct {
	Transport, Action, Outcome string
	N                          int64
}

// Stats is a snapshot of the server's counters (counts since it started) and
// of its state now.
type Stats struct {
	// Sessions ended, by transport, action and outcome; only non-zero entries.
	Sessions []SessionCount
	// HandshakeFailures by reason (StatHandshakeReasons), all reasons present.
	HandshakeFailures map[string]int64
	// ProxyConns are proxy connections whose handshake succeeded, by transport
	// ("tls", "quic"). Website connections are sessions with action "web".
	ProxyConns map[string]int64
	// ResumedConns are the ProxyConns whose handshake resumed a session from a
	// ticket (no certificates exchanged; the device is still checked).
	ResumedConns map[string]int64
	// QUICStreams is how many proxy streams QUIC connections opened.
	QUICStreams int64
	// QUICMigrations is how many times a QUIC connection moved to a client's
	// new address (a NAT rebinding, or the client's new network).
	QUICMigrations int64
	// BytesUp and BytesDown are the bytes relayed client→destination and
	// destination→client by sessions that ended (public sessions included).
	BytesUp, BytesDown int64
	// Live sessions now (established, as Live), agents connected, reverse
	// names registered (held through a grace period included) and public ports
	// open.
	Live, Agents, ReverseNames, PublicPorts int
	UDP                                     UDPStats
	// Peer sessions carried between instances, by direction ("out": forwarded
	// to the instance that serves the name, "in": served here for another).
	Peer map[string]PeerStats
	// Leases of reverse names in the database (with a hold store).
	Leases LeaseStats
	// STUN Binding requests on the QUIC socket.
	STUN STUNStats
}

// LeaseStats count what happened to the leases of this instance's reverse
// names, public ports and pass-through names in the database.
type LeaseStats struct {
	// Renewals and RenewalFailures count the rounds that renewed the leases,
	// and those that could not reach the database.
	Renewals, RenewalFailures int64
	// Fenced counts the names this instance stopped serving because their
	// lease ran out before it could renew it (the database was unreachable);
	// TakenOver, those another instance took over.
	Fenced, TakenOver int64
}

// Stats returns the server's counters. It takes the registries' locks briefly,
// so a scrape every few seconds costs the data plane nothing it would notice.
func (s *Server) Stats() Stats {
	c := &s.stats
	// The sessions first: their byte and datagram counts are added before the
	// session is counted, so what is read after them includes theirs.
	var sessions []SessionCount
	for t := range nTransports {
		for a := range nActions {
			for o := range nOutcomes {
				if n := c.sessions[t][a][o].Load(); n > 0 {
					sessions = append(sessions, SessionCount{StatTransports[t], StatActions[a], StatOutcomes[o], n})
				}
			}
		}
	}
	st := Stats{
		Sessions:          sessions,
		HandshakeFailures: make(map[string]int64, nReasons),
		ProxyConns:        map[string]int64{"tls": c.proxyConns[0].Load(), "quic": c.proxyConns[1].Load()},
		ResumedConns:      map[string]int64{"tls": c.resumedConns[0].Load(), "quic": c.resumedConns[1].Load()},
		QUICStreams:       c.quicStreams.Load(),
		QUICMigrations:    c.quicMigrations.Load(),
		BytesUp:           c.bytesUp.Load(),
		BytesDown:         c.bytesDown.Load(),
		Live:              s.Live(),
		UDP:               s.UDPStats(),
		Peer:              c.peerStats(),
		Leases: LeaseStats{Renewals: c.leases.Renewals.Load(), RenewalFailures: c.leases.RenewalFailures.Load(),
			Fenced: c.leases.Fenced.Load(), TakenOver: c.leases.TakenOver.Load()},
		STUN: c.stun.stats(),
	}
	for i, r := range StatHandshakeReasons {
		st.HandshakeFailures[r] = c.handshakes[i].Load()
	}
	if s.rev != nil {
		st.Agents, st.ReverseNames, st.PublicPorts = s.rev.counts()
	}
	return st
}

// counts returns the agents connected, the reverse names held and the public
// ports open.
func (r *reverseRegistry) counts() (agents, names, ports int) {
	seen := make(map[*reverse.Agent]struct{})
	r.Each(func(k, _ string, a *reverse.Agent, ln *reverse.PublicListener) {
		if a != nil {
			seen[a] = struct{}{}
		}
		switch {
		case ln != nil:
			ports++
		case !strings.Contains(k, "/"):
			names++
		}
	})
	return len(seen), names, ports
}

// Listeners is how many listeners Serve and ServeQUIC are accepting on now;
// zero once Shutdown began.
func (s *Server) Listeners() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0
	}
	return len(s.listeners)
}

// quicTracer is quic.Config.Tracer: it feeds the datagram drop counter
// (wire.DatagramDropCounter) and counts connection migrations. quic-go says a
// server connection switched to a client's new address only in its qlog
// events: a tuple assigned to the active path ("").
func (s *Server) quicTracer(ctx context.Context, isClient bool, id quic.ConnectionID) qlogwriter.Trace {
	return migrationTrace{next: s.udp.quicDrops.Tracer(ctx, isClient, id), n: &s.stats.quicMigrations}
}

type migrationTrace struct {
	next qlogwriter.Trace
	n    *atomic.Int64
}

func (t migrationTrace) AddProducer() qlogwriter.Recorder {
	return migrationRecorder{next: t.next.AddProducer(), n: t.n}
}

type migrationRecorder struct {
	next qlogwriter.Recorder
	n    *atomic.Int64
}

func (r migrationRecorder) RecordEvent(ev qlogwriter.Event) {
	if ta, ok := ev.(qlog.TupleAssigned); ok && ta.TupleID == "" {
		r.n.Add(1)
	}
	r.next.RecordEvent(ev)
}

func (r migrationRecorder) Close() error { return r.next.Close() }
