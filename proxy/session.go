package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// helloWriteTimeout bounds writing a server hello to a client that does not read.
const helloWriteTimeout = wire.HelloWriteTimeout

// session is the record of one proxy connection, logged once at close.
type session struct {
	start        time.Time
	remote       string
	id           authz.Identity
	dest         string            // host:port as canonicalised
	upstream     string            // the IP:port actually dialed
	decision     string            // "allow", "deny" or "" if policy was not asked
	req          authz.Request     // the request the policy allowed; re-checked while live
	code         string            // server hello code on refusal
	up, down     int64             // bytes client→destination and destination→client
	end          string            // why it ended
	e2e          bool              // a protected reverse name: the client runs TLS inside
	spliced      bool              // a UDP session to an agent: a byte stream for the relay
	network      string            // "tcp", or "udp" for a UDP flow (udp.go)
	attrs        []slog.Attr       // more for the log line (a UDP flow's counters)
	op           *wire.ClientHello // a reverse operation (listen, accept) for serveStream
	sid          string            // session id sent with the ok, for op "why"
	peer         string            // who is on the other side: "destination" or "agent"
	peerSID      string            // a dial forwarded to another instance: its session id there
	peerInstance string            // … and that instance
	counted      bool              // holds a slot of MaxSessionsPerIdentity (limits.go)
	audit        auditState        // what the audit record and the counters (stats.go) need besides the above (audit.go)
	hold         func()            // releases the agent's QUIC connection the session runs over (quicholds.go)
}

func (s *Server) serveProxy(ctx context.Context, conn *tls.Conn) {
	s.serveStream(ctx, conn, connectionState(conn), "tls")
}

// connectionState returns conn's state on the heap rather than in the caller's
// frame, which an idle session keeps (see handle).
//
//go:noinline
func connectionState(conn *tls.Conn) *tls.ConnectionState {
	cs := conn.ConnectionState()
	return &cs
}

// ServeStream runs one proxy request on stream, whose peer was authenticated by
// the handshake described by cs; transport ("tls" or "quic") is shown to the
// policy as input.source.transport. It returns when the request ends and closes stream.
func (s *Server) ServeStream(ctx context.Context, conn wire.Stream, cs tls.ConnectionState, transport string) {
	s.serveStream(ctx, conn, &cs, transport)
}

// serveStream is ServeStream. The request's set-up (open) runs on a goroutine of
// its own: it goes deep (certificate parsing, the policy evaluation, dialing) and
// a goroutine's stack keeps the size it grew to until the garbage collector
// shrinks it, one halving per cycle. Here the deep stack dies with the set-up,
// and an idle session parks on this goroutine with the few frames of relay and
// Bridge (see handle).
func (s *Server) serveStream(ctx context.Context, conn wire.Stream, cs *tls.ConnectionState, transport string) {
	s.serveStreamOf(ctx, conn, cs, transport, nil)
}

// serveStreamOf is serveStream for a stream of a connection that carries many
// requests, whose cancelled requests flood counts (flood.go).
func (s *Server) serveStreamOf(ctx context.Context, conn wire.Stream, cs *tls.ConnectionState, transport string, flood *cancelFlood) {
	ss := newSession(conn)
	if r, ok := s.carrierRemote(conn.RemoteAddr()); ok {
		ss.remote = r // the client's real address, not its carrier session's virtual one
	}
	ss.audit.transport = transport
	defer func() { s.logSession(ctx, ss) }()
	defer s.releaseSession(ss) // however the session ends
	// The set-up ends when the client cancels the request before its answer:
	// its dial does not go on for nobody.
	setup, cancelSetup := context.WithCancelCause(ctx)
	defer cancelSetup(nil)
	stopWatch := func() bool { return true }
	if sc, ok := conn.(streamContext); ok {
		sctx := sc.Context()
		stopWatch = context.AfterFunc(sctx, func() {
			if wire.PeerCancelled(context.Cause(sctx)) {
				cancelSetup(errClientCancelled)
			}
		})
	}
	var upstream net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		upstream = s.open(setup, conn, cs, transport, ss)
	}()
	<-done
	stopWatch()
	if errors.Is(context.Cause(setup), errClientCancelled) {
		flood.cancelledOne() // the client cancelled it (or its connection ended) during the set-up
	} else {
		flood.answeredOne()
	}
	switch {
	case ss.op != nil: // a reverse listen or accept, which lives as long as the session
		s.serveOp(ctx, conn, cs, transport, ss)
	case upstream == nil: // refused, and answered
	case ss.network == "udp" && !ss.spliced: // datagrams, not a byte stream (udp.go)
		s.serveUDP(ctx, conn, *cs, ss, upstream)
	default:
		s.relay(ctx, conn, cs, ss, upstream)
	}
}

// newSession starts the record of a request, on the heap rather than in
// serveStream's frame.
//
//go:noinline
func newSession(conn wire.Stream) *session {
	return &session{start: time.Now(), remote: conn.RemoteAddr().String()}
}

// open runs the request up to the server hello ok and returns the connected
// upstream to relay. It returns nil when it refused the request (and said so), or
// when the request is a reverse operation (ss.op) for serveStream to serve. A UDP
// flow's upstream is returned before the server hello, which serveUDP sends.
func (s *Server) open(ctx context.Context, conn wire.Stream, cs *tls.ConnectionState, transport string, ss *session) net.Conn {
	upstream, herr := s.establish(ctx, conn, *cs, transport, ss)
	if herr != nil {
		s.refused(conn, ss, herr)
		return nil
	}
	if upstream == nil || ss.network == "udp" && !ss.spliced {
		return upstream
	}
	ss.sid = newSessionID()
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true, E2E: ss.e2e, Session: ss.sid}); err != nil {
		_ = conn.Close()
		_ = upstream.Close()
		ss.end = "writing server hello: " + err.Error()
		return nil
	}
	_ = conn.SetWriteDeadline(time.Time{})
	return upstream
}

// serveOp serves a reverse listen or accept (reverse.go) until it ends.
//
//go:noinline
func (s *Server) serveOp(ctx context.Context, conn wire.Stream, cs *tls.ConnectionState, transport string, ss *session) {
	if herr := s.serveReverseOp(ctx, conn, *cs, transport, ss, *ss.op); herr != errHandled {
		s.refused(conn, ss, herr)
	}
}

// refused records herr in ss and sends it, unless a reverse operation already
// owned the stream (errHandled).
func (s *Server) refused(conn wire.Stream, ss *session, herr *wire.HelloError) {
	if herr == nil || herr == errHandled {
		return
	}
	ss.code = herr.Code
	if ss.end == "" {
		ss.end = herr.Error()
	}
	s.refuse(conn, herr)
}

// relay bridges an established session until it ends.
func (s *Server) relay(ctx context.Context, conn wire.Stream, cs *tls.ConnectionState, ss *session, upstream net.Conn) {
	// The session may not outlive the certificate that authorised it, nor the
	// policy, groups and deny list that allowed it (see Recheck). One context and
	// a timer rather than a context per bound: each one stays allocated while the
	// tunnel idles.
	bctx, revoke := context.WithCancelCause(ctx)
	defer revoke(nil)
	expire := time.AfterFunc(time.Until(ss.id.NotAfter), func() { revoke(wire.ErrCertExpired) })
	defer expire.Stop()
	defer s.sessions.add(&liveSession{cs: *cs, req: ss.req, revoke: revoke})()
	if ss.peerSID != "" {
		defer s.peerLive.track(ss.peerSID, ss.peerInstance, revoke)() // the serving instance may say why it ends (peer_end.go)
	}
	// How the session was cut is recorded before the resets go out, so that a
	// client asking "why" right after its connection was reset finds the answer.
	up, down, err := wire.BridgeNotify(bctx, conn, upstream, func(err error) {
		s.ends.add(ss.sid, ss.id.DeviceID, ss.endOf(err))
	})
	ss.up, ss.down = up, down
	ss.audit.err = err
	switch {
	case err != nil:
		ss.end = err.Error()
	default:
		ss.end = "closed"
	}
}

// endOf says how an abort caused by err ended the session, for op "why". It names
// the destination as the client asked for it, never the address dialed.
func (ss *session) endOf(err error) wire.SessionEnd {
	var ee *wire.EndError
	var re *wire.RevokedError
	var ce *wire.CutError
	switch {
	case errors.As(err, &ee):
		return ee.End()
	case errors.As(err, &re):
		return wire.SessionEnd{Code: wire.EndName(re.Code()), By: "server", Reason: "the TP server ended the session: " + re.Reason}
	case errors.As(err, &ce) && ce.B && ss.peer == "agent":
		return wire.SessionEnd{Code: wire.EndPeerReset, By: "agent", Reason: "the exposed service's side of the session to " + ss.dest + " was cut off (its agent could not connect to its local service or lost it, or the agent disconnected)"}
	case errors.As(err, &ce) && ce.B:
		return wire.SessionEnd{Code: wire.EndPeerReset, By: "destination", Reason: "the destination " + ss.dest + " reset the connection or failed"}
	case errors.As(err, &ce):
		return wire.SessionEnd{Code: wire.EndPeerReset, By: "client", Reason: "the TP server saw this client's side of the session fail: " + wire.UnwrapOpError(ce.Err).Error()}
	case errors.Is(err, context.Canceled):
		return wire.ErrShutdown.End()
	}
	return wire.SessionEnd{Code: wire.EndInternal, By: "server", Reason: "the TP server ended the session after an internal error"}
}

// establish runs the session up to a connected upstream, or returns the refusal to
// send; for a reverse operation it returns neither and sets ss.op. It fills ss as
// it learns things.
func (s *Server) establish(ctx context.Context, conn wire.Stream, cs tls.ConnectionState, transport string, ss *session) (net.Conn, *wire.HelloError) {
	if herr := s.authenticate(cs, ss); herr != nil {
		return nil, herr
	}
	hello, herr := s.readHello(conn, ss)
	if herr != nil {
		return nil, herr
	}
	return s.enter(ctx, conn, transport, ss, hello)
}

// authenticate sets ss.id from the verified client certificate of cs, or returns
// the refusal to send.
func (s *Server) authenticate(cs tls.ConnectionState, ss *session) *wire.HelloError {
	if len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return wire.Errorf(wire.CodeUnauthenticated, "no verified client certificate")
	}
	id, err := s.cfg.Identify(cs)
	if err != nil {
		ss.end = "identify: " + err.Error()
		return wire.Errorf(wire.CodeUnauthenticated, "client certificate not accepted: %v", err)
	}
	// Fail closed on an identity without expiry: use the leaf's.
	if leafNA := cs.PeerCertificates[0].NotAfter; id.NotAfter.IsZero() || leafNA.Before(id.NotAfter) {
		id.NotAfter = leafNA
	}
	ss.id = id
	if !time.Now().Before(id.NotAfter) {
		return wire.Errorf(wire.CodeUnauthenticated, "client certificate expired at %s", id.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// cutReadOnDrain makes a read that waits for a request (a hello, a peer's
// open) end when Shutdown begins, by setting conn's read deadline to now. The
// stop it returns undoes that and, when the drain has already begun to set the
// deadline, waits until it has: the caller then clears or replaces the deadline
// knowing that no late "now" from the drain follows. Without the wait, a
// request read just as the drain began could keep that deadline and see its
// session's first read fail ("deadline exceeded") and the client its stream
// reset, instead of being served or refused.
func (s *Server) cutReadOnDrain(conn interface{ SetReadDeadline(time.Time) error }) (stop func()) {
	done := make(chan struct{})
	stopHook := context.AfterFunc(s.draining, func() {
		defer close(done)
		_ = conn.SetReadDeadline(time.Now())
	})
	return func() {
		if !stopHook() {
			<-done
		}
	}
}

// readHello reads the client hello within HelloTimeout, or returns the refusal
// to send.
func (s *Server) readHello(conn wire.Stream, ss *session) (wire.ClientHello, *wire.HelloError) {
	_ = conn.SetReadDeadline(time.Now().Add(s.lim().HelloTimeout))
	// A connection that has sent no hello when Shutdown begins (a client's spare
	// connection, say) holds no session: it must not hold up the drain.
	stopDrain := s.cutReadOnDrain(conn)
	hello, err := wire.ReadClientHello(conn)
	stopDrain()
	if err != nil {
		var he *wire.HelloError
		var ne net.Error
		switch {
		case errors.As(err, &he):
			return hello, he
		case (errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()) && s.draining.Err() != nil:
			return hello, wire.Errorf(wire.CodeHelloTimeout, "the server is shutting down and no longer waits for hellos; reconnect")
		case errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
			return hello, wire.Errorf(wire.CodeHelloTimeout, "no complete client hello within %s", s.lim().HelloTimeout)
		default:
			ss.end = "reading client hello: " + err.Error()
			return hello, wire.Errorf(wire.CodeBadRequest, "reading client hello: %v", err)
		}
	}
	_ = conn.SetReadDeadline(time.Time{})
	return hello, nil
}

// enter runs a request whose hello was read (or, for an HTTP CONNECT, built from
// the request: httpconnect.go) by an authenticated client (ss.id) up to a
// connected upstream, or returns the refusal to send; for a reverse operation it
// returns neither and sets ss.op. conn is used only to answer op "why"; it may be
// nil for any other op.
func (s *Server) enter(ctx context.Context, conn wire.Stream, transport string, ss *session, hello wire.ClientHello) (net.Conn, *wire.HelloError) {
	id := ss.id
	ss.audit.action = actionOf(hello)
	if hello.Op == wire.OpWhy { // answered at once, so not counted
		return nil, s.why(conn, ss, hello.Session)
	}
	if hello.Op == wire.OpBye { // housekeeping of the connection (bye.go)
		return nil, s.bye(ctx, conn)
	}
	if hello.Op != wire.OpAccept { // an accept carries another identity's session, counted there
		if herr := s.countSession(ss); herr != nil {
			return nil, herr
		}
	}
	if hello.Op != wire.OpDial { // served by serveStream: it lasts as long as the session
		ss.op = &hello
		return nil, nil
	}

	host := canonicalHost(hello.Host)
	ss.dest = net.JoinHostPort(host, strconv.Itoa(hello.Port))
	ss.network = hello.Net
	if s.rev != nil {
		if label, ok := s.rev.Name(host); ok {
			return s.establishReverse(ctx, conn, ss, host, label, hello.Port, transport)
		}
		if s.rev.InZone(host) {
			return nil, wire.Errorf(wire.CodeReverseUnknown, "%s is under the reverse zone but is no reverse name (NAME.%s, one label); nothing there is looked up on the network", host, s.rev.opts.Zone)
		}
	}

	// A name that does not resolve is put to the policy too, with no addresses:
	// only a device the policy allows to reach the name learns that it does not
	// resolve. Any other device is refused as it would be for a name that exists,
	// so no device learns which names exist by trying them. And a name that no
	// address could get allowed is not looked up at all (precheck): a device
	// cannot make tpd send DNS queries of its choosing out of the network.
	lookup, herr := s.precheck(ctx, ss, host, hello, transport)
	if herr != nil {
		return nil, herr
	}
	for {
		var ips []netip.Addr
		var lookupErr error
		if lookup {
			if ips, lookupErr, herr = s.resolve(ctx, host); herr != nil {
				return nil, herr
			}
		}
		if lookupErr == nil {
			if herr := s.checkSelf(ss, ips, hello.Port); herr != nil {
				return nil, herr
			}
		}

		req := authz.Request{
			Action:      dialAction(hello.Net),
			Identity:    id,
			Destination: authz.Destination{Host: host, Port: hello.Port, Network: hello.Net, IPs: ips},
			Source:      authz.Source{Address: ss.remote, Transport: transport},
			Time:        time.Now(),
		}
		actx, acancel := context.WithTimeout(ctx, s.lim().DialTimeout)
		dec, err := s.cfg.Authorizer.Authorize(actx, req)
		acancel()
		ss.audit.revision = dec.Revision
		// The session's log line says why the name did not resolve, whatever the client is told.
		note := ""
		if lookupErr != nil {
			note = " (" + lookupErr.Error() + ")"
		}
		if err != nil {
			ss.decision = "deny"
			ss.end = "policy evaluation failed: " + err.Error() + note
			return nil, policyError(err)
		}
		if !dec.Allow {
			ss.decision = "deny"
			reason := dec.Reason
			if reason == "" {
				reason = "no policy rule allows this destination"
			}
			herr := &wire.HelloError{Code: wire.CodePolicyDenied, Reason: reason}
			ss.end = herr.Error() + note
			return nil, herr
		}
		if !lookup {
			// Allowed without addresses after the precheck said no addresses
			// could be: the policy changed in between. Look up, decide again.
			lookup = true
			continue
		}
		if lookupErr != nil {
			ss.decision = "allow"
			ss.end = lookupErr.Error()
			return nil, resolveFailed(host)
		}
		ss.decision = "allow"
		ss.req = req
		ss.peer = "destination"
		return s.dial(ctx, ss, hello.Net, ips, hello.Port)
	}
}

// precheck decides, for a destination named by a valid name, whether to look it
// up: only when the policy could allow the request for some addresses
// (authz.Prechecker). It returns false with no refusal when the name is not to
// be looked up: enter then decides without addresses, which denies. An IP
// literal, or an Authorizer that cannot tell, is looked up (resolve returns a
// literal as it is). A failed precheck denies.
func (s *Server) precheck(ctx context.Context, ss *session, host string, hello wire.ClientHello, transport string) (lookup bool, herr *wire.HelloError) {
	pc, ok := s.cfg.Authorizer.(authz.Prechecker)
	if !ok {
		return true, nil
	}
	if c, err := CanonicalHost(host); err != nil {
		return true, nil // resolve refuses it as bad_request
	} else if _, err := netip.ParseAddr(c); err == nil {
		return true, nil
	}
	req := authz.Request{
		Action:      dialAction(hello.Net),
		Identity:    ss.id,
		Destination: authz.Destination{Host: host, Port: hello.Port, Network: hello.Net},
		Source:      authz.Source{Address: ss.remote, Transport: transport},
		Time:        time.Now(),
	}
	actx, acancel := context.WithTimeout(ctx, s.lim().DialTimeout)
	may, err := pc.MayAllow(actx, req)
	acancel()
	if err != nil {
		ss.decision = "deny"
		ss.end = "policy evaluation failed: " + err.Error()
		return false, policyError(err)
	}
	return may, nil
}

// why answers op "why": how the identity's session sid was aborted, if it was
// within the last endRecordTTL.
func (s *Server) why(conn wire.Stream, ss *session, sid string) *wire.HelloError {
	ss.dest = "why " + sid
	end, ok := s.ends.get(sid, ss.id.DeviceID)
	if !ok {
		return wire.Errorf(wire.CodeUnknownSession, "this server knows of no session %s of %s that was cut off in the last %s (it ended cleanly, is still running, or belongs to another device)", sid, ss.id, endRecordTTL)
	}
	ss.end = "answered why"
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true, End: &end}); err == nil {
		_ = conn.CloseWrite()
	}
	_ = conn.Close()
	return errHandled
}

// refuse sends a refusal and closes conn. It half-closes first and drains what the
// client already sent for a moment, so the kernel does not answer unread data with
// a reset that would destroy the hello before the client reads it. What it drains
// covers a second hello and the early data a client may send after its hello
// (wire.MaxEarlyData); it is discarded, never relayed.
func (s *Server) refuse(conn wire.Stream, herr *wire.HelloError) {
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, Code: herr.Code, Reason: herr.Reason}); err == nil {
		_ = conn.CloseWrite()
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.CopyN(io.Discard, conn, 2*(wire.MaxHelloSize+2)+wire.MaxEarlyData)
	}
	_ = conn.Close()
}

func (s *Server) logSession(ctx context.Context, ss *session) {
	if ss.audit.action == wire.OpBye {
		return // the connection's housekeeping, not a session (bye.go)
	}
	attrs := []slog.Attr{
		slog.String("remote", ss.remote),
		slog.String("identity", ss.id.String()),
		slog.String("serial", ss.id.Serial),
		slog.String("dest", ss.dest),
		slog.String("upstream", ss.upstream),
		slog.String("decision", ss.decision),
		slog.Int64("bytes_up", ss.up),
		slog.Int64("bytes_down", ss.down),
		slog.Duration("duration", time.Since(ss.start)),
		slog.String("end", ss.end),
	}
	if ss.code != "" {
		attrs = append(attrs, slog.String("code", ss.code))
	}
	attrs = append(attrs, ss.attrs...)
	s.log.LogAttrs(ctx, slog.LevelInfo, "proxy session", attrs...)
	s.stats.session(ss.audit.transport, ss.audit.action, ss.code, ss.up, ss.down)
	s.auditSession(ss)
}
