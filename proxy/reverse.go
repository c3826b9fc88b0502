package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// ReverseOptions configure reverse listeners. An empty Zone disables them.
type ReverseOptions struct {
	// Zone is the DNS suffix reverse names live under: agent name "laptop-ssh"
	// becomes "laptop-ssh.<Zone>". Names under it never reach the network, so the
	// zone must not be one that real hosts use (e.g. "rev.tp.example.org").
	Zone string
	// Grace is how long a name stays reserved for its owner after the owner's
	// control session ended (network change, tpd restart on the agent's side).
	// Default 30s.
	Grace time.Duration
	// RestartGrace is how long the holds restored from Holds stay reserved for
	// their owners after the server starts, at least Grace. It must outlast the
	// time an agent needs to notice that the server restarted and come back: its
	// idle timeout when nothing told it, plus its longest reconnect backoff
	// (about 45 s for `tp expose`). Default 2m.
	RestartGrace time.Duration
	// MaxPending bounds the sessions announced to one agent over TLS and not yet
	// picked up; beyond it the oldest is refused. Default 1000.
	MaxPending int
	// MaxNamesPerIdentity bounds the reverse names and public exposures one
	// device identity holds at once, over all its control sessions and including
	// those reserved for it while an agent reconnects; a listen beyond it is
	// refused with CodeTooManyNames. Default DefaultMaxNamesPerIdentity.
	MaxNamesPerIdentity int
	// MaxPendingPerIdentity bounds the dials of reverse names one device identity
	// has waiting for their agents to pick them up, so that one dialer cannot
	// fill an agent's MaxPending and push out everyone else's sessions. Excess
	// dials are refused with CodeTooManyPending. Default DefaultMaxPendingPerIdentity.
	MaxPendingPerIdentity int
	// PickupTimeout bounds how long a dial waits for the agent to pick the session
	// up. Default 10s.
	PickupTimeout time.Duration
	// Ping is the period of keepalive frames on TLS control connections, sent
	// with each (the agent takes twice the period's silence as a lost
	// connection). Default 15s; with a Store, at most Renew, so that an agent
	// of an instance that froze notices it before the lease lapses.
	Ping time.Duration

	// Store, when set, records holds in a database several instances share
	// (proxy/reverse/leases.go); Holds and SaveHolds are then unused. Lease is how long a
	// claim or renewal lets this instance serve a key without renewing again
	// (default DefaultLease); Renew is how often it renews (default
	// DefaultRenew, at most Lease/3). RunLeases must run for renewals to happen.
	Store reverse.HoldStore
	Lease time.Duration
	Renew time.Duration

	// Public mode (reverse_public.go). PublicPorts says whether the administrator
	// lets agents open a public port (network "tcp", port); nil opens none.
	// PublicHost is the address public ports listen on ("" = all addresses).
	PublicPorts func(network string, port int) bool
	PublicHost  string
	// PublicSNI says whether an agent may take a server name for TLS pass-through
	// on the shared port; its error is the refusal shown to the agent. nil turns
	// SNI pass-through off. It must refuse the server's own names and websites.
	PublicSNI func(serverName string) error
	// Holds are the names and exposures held when the server last stopped; they
	// stay reserved for their owners for RestartGrace, so a restart (a crash
	// included) opens no window for another identity. SaveHolds is called with the current holds after every
	// change (serialised, newest last); nil keeps them in memory only.
	Holds     []reverse.Hold
	SaveHolds func([]reverse.Hold)
	// HTTPTunnels bounds the reverse tunnels of draft-kazuho-httpbis-reverse-tunnel
	// (revtunnel.go).
	HTTPTunnels ReverseTunnelOptions
}

func (o ReverseOptions) withDefaults() ReverseOptions {
	o.Zone = strings.TrimSuffix(strings.ToLower(o.Zone), ".")
	if o.Grace <= 0 {
		o.Grace = 30 * time.Second
	}
	if o.RestartGrace <= 0 {
		o.RestartGrace = 2 * time.Minute
	}
	o.RestartGrace = max(o.RestartGrace, o.Grace)
	if o.MaxPending <= 0 {
		o.MaxPending = 1000
	}
	if o.MaxNamesPerIdentity <= 0 {
		o.MaxNamesPerIdentity = DefaultMaxNamesPerIdentity
	}
	if o.MaxPendingPerIdentity <= 0 {
		o.MaxPendingPerIdentity = DefaultMaxPendingPerIdentity
	}
	if o.PickupTimeout <= 0 {
		o.PickupTimeout = 10 * time.Second
	}
	if o.Ping <= 0 {
		o.Ping = 15 * time.Second
	}
	if o.Lease <= 0 {
		o.Lease = DefaultLease
	}
	if o.Renew <= 0 {
		o.Renew = DefaultRenew
	}
	o.Renew = min(o.Renew, o.Lease/3)
	if o.Store != nil {
		o.Ping = min(o.Ping, o.Renew)
	}
	return o
}

// withAsked makes a policy's refusal name what was asked (authz.Request.Asked)
// when its reason does not already: a policy's own reason ("public ports need
// the ops group") says why, not which of the request's names and ports it was about.
func withAsked(herr *wire.HelloError, asked string) *wire.HelloError {
	if herr.Code != wire.CodePolicyDenied || strings.Contains(herr.Reason, asked) {
		return herr
	}
	return &wire.HelloError{Code: herr.Code, Reason: "cannot " + asked + ": " + herr.Reason}
}

// errHandled tells ServeStream that a reverse operation owned the stream.
var errHandled = &wire.HelloError{Code: "handled"}

// ReverseOwner returns the device ID that holds the reverse name host (a full
// name under the zone), online or within its grace period. The CA asks it before
// it lets a device prove control of a reverse name.
func (s *Server) ReverseOwner(host string) (string, bool) {
	if s.rev == nil {
		return "", false
	}
	return s.rev.Owner(strings.TrimSuffix(strings.ToLower(host), "."))
}

// ReverseZone is the configured reverse zone, "" when reverse listeners are off.
func (s *Server) ReverseZone() string {
	if s.rev == nil {
		return ""
	}
	return s.rev.opts.Zone
}

// serveReverseOp runs a listen or accept request. It returns errHandled when it
// owned the stream to the end, or a refusal for ServeStream to send.
func (s *Server) serveReverseOp(ctx context.Context, conn wire.Stream, cs tls.ConnectionState, transport string, ss *session, hello wire.ClientHello) *wire.HelloError {
	if s.rev == nil {
		return wire.Errorf(wire.CodeReverseDisabled, "this TP server has no reverse zone, so it serves no reverse listeners; the administrator sets reverse-zone in tpd.yaml")
	}
	if hello.Op == wire.OpAccept {
		return s.serveAccept(ctx, conn, ss, hello)
	}
	return s.serveListen(ctx, conn, cs, transport, ss, hello)
}

func (s *Server) serveListen(ctx context.Context, conn wire.Stream, cs tls.ConnectionState, transport string, ss *session, hello wire.ClientHello) *wire.HelloError {
	a := &reverse.Agent{ID: ss.id, Transport: transport, Ctl: conn, UDP: map[string]bool{}}
	reqs := make([]authz.Request, 0, len(hello.Names))
	asked := make([]string, 0, len(hello.Names)+len(hello.Public)) // for the log and audit lines, also of a refusal
	for _, n := range hello.Names {
		asked = append(asked, n+"."+s.rev.opts.Zone)
	}
	for _, p := range hello.Public {
		asked = append(asked, p.Key())
	}
	ss.dest = "listen " + strings.Join(asked, ",")
	for _, n := range hello.Names {
		full := n + "." + s.rev.opts.Zone
		a.Names = append(a.Names, full)
		network := "tcp"
		if slices.Contains(hello.UDP, n) {
			network = "udp"
			a.UDP[full] = true
		}
		req := authz.Request{
			Action:      authz.ActionListen,
			Identity:    ss.id,
			Destination: authz.Destination{Host: full, Network: network, Reverse: n},
			Source:      authz.Source{Address: ss.remote, Transport: transport},
			Time:        time.Now(),
		}
		if herr := s.decide(ctx, ss, req, "no policy rule allows "+ss.id.String()+" to "+req.Asked()); herr != nil {
			// A name asked for publicly: the refusal says what the person asked.
			for _, p := range hello.Public {
				if p.Name == n {
					return withAsked(herr, publicRequest(req, p).Asked())
				}
			}
			return herr
		}
		reqs = append(reqs, req)
	}
	pub, preqs, herr := s.publicClaims(ctx, ss, hello, transport)
	if herr != nil {
		return herr
	}
	a.Public, reqs = pub, append(reqs, preqs...)
	if qs, ok := conn.(*wire.QUICStream); ok {
		a.Open, a.OpenFlow = s.rev.QUICOpener(qs)
	} else {
		a.Open = s.rev.TLSOpener(a)
		a.OpenFlow = func(ctx context.Context, hdr wire.SessionHeader, queueLen int) (*wire.UDPFlow, *wire.HelloError) {
			st, herr := a.Open(ctx, hdr)
			if herr != nil {
				return nil, herr
			}
			f, err := wire.NewUDPFlow(st, queueLen, nil) // capsules: no datagrams on TLS
			if err != nil {
				_ = st.Close()
				return nil, wire.Errorf(wire.CodeInternal, "%v", err)
			}
			return f, nil
		}
	}

	ctx, cancel := context.WithDeadlineCause(ctx, ss.id.NotAfter, wire.ErrCertExpired)
	defer cancel()
	ctx, end := context.WithCancelCause(ctx)
	defer end(nil)
	a.End, a.Ctx = end, ctx
	replaced, herr := s.rev.Claim(a)
	if herr != nil {
		return herr
	}
	for _, old := range replaced {
		old.End(reverse.ErrReplaced)
	}
	defer func() { s.rev.Release(a, s.rev.GraceAfter(context.Cause(ctx))) }()
	for _, req := range reqs {
		defer s.sessions.add(&liveSession{cs: cs, req: req, revoke: end})()
	}

	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true, Names: a.Names}); err != nil {
		ss.end = "writing server hello: " + err.Error()
		_ = conn.Close()
		return errHandled
	}
	_ = conn.SetWriteDeadline(time.Time{})
	s.log.LogAttrs(ctx, slog.LevelInfo, "reverse listener registered",
		slog.String("identity", ss.id.String()), slog.String("names", strings.Join(a.Names, ",")), slog.String("transport", transport))

	// The agent sends one frame after its hello, {"end":"unregister"}, when it
	// stops; otherwise a read ends when it goes away.
	go func() {
		h, err := wire.ReadSessionHeader(conn)
		var herr *wire.HelloError
		switch {
		case err == nil && h.End == "unregister":
			err = reverse.ErrUnregistered
		case err == nil:
			err = &controlViolation{"the agent sent a frame other than {\"v\":1,\"end\":\"unregister\"} on its control stream"}
		case errors.As(err, &herr): // a frame that arrived whole but is malformed
			err = &controlViolation{"the agent sent a malformed frame on its control stream: " + herr.Reason}
		}
		end(fmt.Errorf("control stream ended: %w", err))
	}()
	if transport != "quic" {
		// A ping at once tells the agent the period; then one every period.
		ping := wire.SessionHeader{V: wire.Version, Ping: true, PingMS: s.rev.opts.Ping.Milliseconds()}
		if err := a.WriteFrame(ping); err != nil {
			end(fmt.Errorf("control connection: %w", err))
		}
		t := time.NewTicker(s.rev.opts.Ping)
		defer t.Stop()
	loop:
		for {
			select {
			case <-ctx.Done():
				break loop
			case <-t.C:
				if err := a.WriteFrame(ping); err != nil {
					end(fmt.Errorf("control connection: %w", err))
				}
			}
		}
	} else {
		<-ctx.Done()
	}
	cause := context.Cause(ctx)
	var rev *wire.RevokedError
	var cv *controlViolation
	switch {
	case errors.Is(cause, reverse.ErrReplaced):
		_ = a.WriteFrame(wire.SessionHeader{V: wire.Version, End: "replaced", Reason: "a newer agent of the same device took over these names"})
	case errors.Is(cause, reverse.ErrTakenOver):
		_ = a.WriteFrame(wire.SessionHeader{V: wire.Version, End: "replaced", Reason: reverse.ErrTakenOver.Error()})
	case errors.Is(cause, reverse.ErrFenced): // the agent reconnects, maybe to another instance
		_ = a.WriteFrame(wire.SessionHeader{V: wire.Version, End: wire.EndShutdown,
			Reason: reverse.ErrFenced.Error() + " (is its database reachable?); reconnect (the names stay held for this device meanwhile)"})
	case errors.As(cause, &rev) && rev.Revoked: // the device, its user or its approver is revoked: final
		_ = a.WriteFrame(wire.SessionHeader{V: wire.Version, End: wire.EndRevoked, Reason: rev.Reason})
	case errors.As(cause, &rev):
		_ = a.WriteFrame(wire.SessionHeader{V: wire.Version, End: wire.CodePolicyDenied, Reason: rev.Reason})
	case errors.Is(cause, wire.ErrShutdown):
		_ = a.WriteFrame(wire.SessionHeader{V: wire.Version, End: wire.EndShutdown, Reason: "the TP server is shutting down; reconnect (the names stay held for this device meanwhile)"})
	case errors.Is(cause, wire.ErrCertExpired):
		_ = a.WriteFrame(wire.SessionHeader{V: wire.Version, End: "cert_expired", Reason: "the client certificate expired; the agent reconnects with a fresh one"})
	case errors.As(cause, &cv): // tell the agent why, so that its log says what it got wrong
		_ = a.WriteFrame(wire.SessionHeader{V: wire.Version, End: wire.CodeBadRequest,
			Reason: cv.reason + "; the TP server ended the control session (the names stay held for the grace period)"})
	}
	ss.end = cause.Error()
	ss.audit.err = cause
	_ = conn.Close()
	return errHandled
}

// controlViolation is a frame from the agent on its control stream that the
// protocol does not allow (docs/PROTOCOL.md, section 11.7): the server ends the
// control session with {"end":"bad_request"}.
type controlViolation struct{ reason string }

func (e *controlViolation) Error() string { return e.reason }

func (s *Server) serveAccept(ctx context.Context, conn wire.Stream, ss *session, hello wire.ClientHello) *wire.HelloError {
	p := s.rev.Pending(hello.Session)
	if p == nil && s.forwardAccept(ctx, conn, ss, hello) {
		return errHandled // pending on another instance, and relayed there (peer_accept.go)
	}
	if p == nil || p.Agent().ID.DeviceID != ss.id.DeviceID {
		return wire.Errorf(wire.CodeUnknownSession, "session %s is not waiting for %s (it expired, or was announced to another agent)", hello.Session, ss.id)
	}
	ss.dest = "accept " + hello.Session
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true}); err != nil {
		ss.end = "writing server hello: " + err.Error()
		_ = conn.Close()
		return errHandled
	}
	_ = conn.SetWriteDeadline(time.Time{})
	ps, ok := s.rev.Pair(p, conn)
	if !ok {
		ss.end = "the session expired before it was accepted"
		_ = conn.Close()
		return errHandled
	}
	select {
	case <-ps.Done():
		ss.end = "paired session ended"
	case <-ctx.Done():
		ss.end = context.Cause(ctx).Error()
		_ = ps.Close()
	}
	return errHandled
}

// establishReverse connects a dial of a reverse name to the name's agent. The
// policy is asked before the name is looked up, so a device the policy refuses
// learns nothing about the name: not whether an agent serves it, nor its network.
func (s *Server) establishReverse(ctx context.Context, conn wire.Stream, ss *session, host, label string, port int, transport string) (net.Conn, *wire.HelloError) {
	req := authz.Request{
		Action:      dialAction(ss.network),
		Identity:    ss.id,
		Destination: authz.Destination{Host: host, Port: port, Network: ss.network, Reverse: label},
		Source:      authz.Source{Address: ss.remote, Transport: transport},
		Time:        time.Now(),
	}
	if herr := s.decide(ctx, ss, req, "no policy rule allows "+ss.id.String()+" to reach "+host); herr != nil {
		return nil, herr
	}
	a, herr := s.rev.Lookup(host)
	if herr != nil {
		// Not served here: maybe by another instance (peer.go).
		return s.establishPeer(ctx, ss, req, host, label, herr)
	}
	if network := a.Network(host); network != ss.network {
		hint := "dial it without --udp"
		if network == "udp" {
			hint = "dial it with --udp (tp forward --udp)"
		}
		return nil, wire.Errorf(wire.CodeUnsupportedNetwork, "%s serves %s, not %s; %s", host, strings.ToUpper(network), strings.ToUpper(ss.network), hint)
	}
	ss.req = req
	ss.upstream = "agent " + a.ID.String() + " (" + a.Transport + ")"
	hdr := s.dialHeader(ss, label)
	if herr := s.rev.acquirePending(ss.id); herr != nil {
		return nil, herr
	}
	st, herr := a.Open(ctx, hdr)
	s.rev.pendingPerID.release(ss.id.DeviceID)
	if herr != nil {
		return nil, herr
	}
	// A public name's sessions are plain streams; a protected one's carry TLS
	// between dialer and agent.
	ss.e2e = !a.IsPublic(host)
	ss.peer = "agent"
	if qs, ok := st.(*wire.QUICStream); ok {
		ss.hold = s.holds.hold(qs.Conn()) // a drain keeps the agent's connection for it
	}
	return st, nil
}

// dialHeader is the session header of ss's dial of label for its agent.
func (s *Server) dialHeader(ss *session, label string) wire.SessionHeader {
	hdr := wire.SessionHeader{V: wire.Version, Session: newSessionID(), Name: label,
		PeerID: ss.id.DeviceID, PeerUser: ss.id.User, PeerGroups: ss.id.Groups,
		PeerGuestOf: ss.id.GuestOf}
	if ss.id.Guest != label {
		hdr.PeerGuestOf = "" // a guest is a guest of its one name only
	}
	if ss.network == "udp" {
		// The relay splices the dialer's stream to the agent's: datagrams travel
		// as capsules end to end (inside the inner TLS session when protected).
		hdr.Net = "udp"
		ss.spliced = true
	}
	return hdr
}

// establishPeer carries a dial, already authorised (req),
// to the instance that serves host, or returns local: this instance's answer
// when no other instance serves it.
func (s *Server) establishPeer(ctx context.Context, ss *session, req authz.Request, host, label string, local *wire.HelloError) (net.Conn, *wire.HelloError) {
	if s.peers == nil {
		return nil, local
	}
	spliced := ss.spliced
	conn, e2e, handled, herr := s.forward(ctx, ss, host, s.dialHeader(ss, label))
	switch {
	case !handled && local.Code == wire.CodeReverseUnknown:
		ss.spliced = spliced
		if _, held := s.rev.StoreOwner(host); held { // its owner's agent is reconnecting, maybe elsewhere
			return nil, wire.Errorf(wire.CodeReverseOffline, "the agent serving %s is offline and reconnecting; try again in a few seconds", host)
		}
		return nil, local
	case !handled:
		ss.spliced = spliced
		return nil, local
	case herr != nil:
		return nil, herr
	}
	ss.req = req
	ss.e2e = e2e
	ss.peer = "agent"
	return conn, nil
}

// decide asks the Authorizer and turns a denial or an error into a refusal.
func (s *Server) decide(ctx context.Context, ss *session, req authz.Request, fallback string) *wire.HelloError {
	actx, acancel := context.WithTimeout(ctx, s.lim().DialTimeout)
	dec, err := s.cfg.Authorizer.Authorize(actx, req)
	acancel()
	ss.audit.revision = dec.Revision
	if err != nil {
		ss.decision = "deny"
		ss.end = "policy evaluation failed: " + err.Error()
		return policyError(err)
	}
	if !dec.Allow {
		ss.decision = "deny"
		reason := dec.Reason
		if reason == "" {
			reason = fallback
		}
		return &wire.HelloError{Code: wire.CodePolicyDenied, Reason: reason}
	}
	ss.decision = "allow"
	return nil
}
