package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// Public mode of reverse listeners (docs/PROTOCOL.md, section 11.5): an agent
// asks, in its listen hello, that some of its names also be reachable by anyone,
// on a TCP port of the TP server or by TLS server name (SNI) on the shared port.
// Public sessions carry no dialer identity and no inner TLS: the relay splices
// the public client's bytes to the agent, which connects them to its local service.

// publicClaim is one public exposure of an agent, as the registry holds it.
type publicClaim struct {
	wire.PublicSpec
	full string // the reverse name it belongs to
}

// publicClaims decides an agent's public exposures: the administrator's bounds
// first (public-ports, refused server names), then the policy with action
// expose_public. It returns the claims and the requests to re-check while live.
func (s *Server) publicClaims(ctx context.Context, ss *session, hello wire.ClientHello, transport string) ([]publicClaim, []authz.Request, *wire.HelloError) {
	o := s.rev.opts
	var claims []publicClaim
	var reqs []authz.Request
	for _, p := range hello.Public {
		full := p.Name + "." + o.Zone
		if p.Port != 0 {
			if o.PublicPorts == nil || !o.PublicPorts(p.Net, p.Port) {
				return nil, nil, wire.Errorf(wire.CodePublicRefused, "this TP server does not open public %s port %d; its administrator lists the ports it may open in public-ports (tpd.yaml)", p.Net, p.Port)
			}
		} else {
			if p.SNI == o.Zone || strings.HasSuffix(p.SNI, "."+o.Zone) {
				return nil, nil, wire.Errorf(wire.CodePublicRefused, "%s is under the reverse zone %s, whose names are reached through TP only", p.SNI, o.Zone)
			}
			if o.PublicSNI == nil {
				return nil, nil, wire.Errorf(wire.CodePublicRefused, "this TP server does not pass TLS through by server name")
			}
			if err := o.PublicSNI(p.SNI); err != nil {
				return nil, nil, wire.Errorf(wire.CodePublicRefused, "%v", err)
			}
		}
		req := publicRequest(authz.Request{
			Identity: ss.id,
			Source:   authz.Source{Address: ss.remote, Transport: transport},
			Time:     time.Now(),
		}, p)
		if p.SNI != "" {
			req.Destination.Port = s.publicTCPPort()
		}
		if herr := s.decide(ctx, ss, req, "no policy rule allows "+ss.id.String()+" to "+req.Asked()); herr != nil {
			return nil, nil, withAsked(herr, req.Asked())
		}
		claims = append(claims, publicClaim{PublicSpec: p, full: full})
		reqs = append(reqs, req)
	}
	return claims, reqs, nil
}

// publicRequest is req as the expose_public request for p: the destination
// the policy sees is the public port, or the server name (whose port
// publicClaims fills in).
func publicRequest(req authz.Request, p wire.PublicSpec) authz.Request {
	req.Action = authz.ActionExposePublic
	req.Destination = authz.Destination{Network: p.Net, Reverse: p.Name, Port: p.Port, Host: p.SNI}
	return req
}

// publicTCPPort is the port of the server's (first) TCP listener: the port SNI
// pass-through is reached on, shown to the policy.
func (s *Server) publicTCPPort() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ln := range s.listeners {
		if a, ok := ln.Addr().(*net.TCPAddr); ok {
			if _, public := ln.(*publicListener); !public {
				return a.Port
			}
		}
	}
	return 443
}

// keys are every registry key a holds: its full names and its public exposures.
func (a *reverseAgent) keys() []string {
	keys := append([]string(nil), a.names...)
	for _, p := range a.public {
		keys = append(keys, p.Key())
	}
	return keys
}

// isPublic reports whether the full name is exposed publicly: its sessions,
// also those of TP dialers, are then plain streams without inner TLS.
func (a *reverseAgent) isPublic(full string) bool {
	for _, p := range a.public {
		if p.full == full {
			return true
		}
	}
	return false
}

// publicListener is a public TCP port (Listener) or UDP port (pc) the server
// opened for an agent.
type publicListener struct {
	net.Listener
	pc      *net.UDPConn
	key     string
	serving atomic.Bool // acceptPublic runs for it
}

func (p *publicListener) Close() error {
	if p.pc != nil {
		return p.pc.Close()
	}
	return p.Listener.Close()
}

func (p *publicListener) Addr() net.Addr {
	if p.pc != nil {
		return p.pc.LocalAddr()
	}
	return p.Listener.Addr()
}

// openPublic opens the listeners a's claims need and that are not open yet.
// Called with r.mu held, before a's entries are recorded.
func (r *reverseRegistry) openPublic(a *reverseAgent) (map[string]*publicListener, *wire.HelloError) {
	opened := map[string]*publicListener{}
	fail := func(herr *wire.HelloError) (map[string]*publicListener, *wire.HelloError) {
		for _, ln := range opened {
			r.srv.untrack(ln)
		}
		return nil, herr
	}
	for _, p := range a.public {
		if p.Port == 0 {
			continue
		}
		if e := r.names[p.Key()]; e != nil && e.ln != nil {
			continue
		}
		if ln := r.takePeerListenerLocked(p.Key()); ln != nil {
			// Open already for another instance's agent: its accept loop
			// runs on (acceptPublic does not start a second) and finds this
			// agent first.
			opened[p.Key()] = ln
			continue
		}
		pl, err := listenPublic(r.opts.PublicHost, p.Net, p.Port, p.Key())
		if err != nil {
			return fail(wire.Errorf(wire.CodePublicRefused, "the TP server cannot open public %s port %d: %v", strings.ToUpper(p.Net), p.Port, err))
		}
		if r.srv == nil || !r.srv.track(pl) {
			_ = pl.Close()
			return fail(wire.Errorf(wire.CodePublicRefused, "the TP server is shutting down"))
		}
		opened[p.Key()] = pl
	}
	return opened, nil
}

// dropLocked forgets entry k and closes its listener. Called with r.mu held.
func (r *reverseRegistry) dropLocked(k string, e *revEntry) {
	if e.timer != nil {
		e.timer.Stop()
	}
	if e.ln != nil && !r.keepForPeerLocked(k, e.ln) {
		r.srv.untrack(e.ln)
	}
	delete(r.names, k)
}

// expire ends the grace period of k: its listener closes and the hold is forgotten.
func (r *reverseRegistry) expire(k string, e *revEntry) {
	r.mu.Lock()
	if r.names[k] == e && e.agent == nil {
		r.dropLocked(k, e)
	}
	r.mu.Unlock()
	r.persist()
}

// lookupKey finds the live agent for a registry key and the label it routes to.
func (r *reverseRegistry) lookupKey(k string) (*reverseAgent, string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.names[k]
	if e == nil || e.agent == nil || !r.currentLocked(k, e, time.Now()) {
		return nil, "", false
	}
	return e.agent, e.label, true
}

// acceptPublic serves a public port until its listener closes.
func (s *Server) acceptPublic(ln *publicListener) {
	if !ln.serving.CompareAndSwap(false, true) {
		return // a port kept open for another instance, taken over by an agent here
	}
	if ln.pc != nil {
		s.servePublicUDP(ln)
		return
	}
	s.log.Info("public port open", "addr", ln.Addr().String(), "exposure", reverse.DescribeKey(ln.key))
	for {
		c, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Warn("public port accept failed; closing it", "addr", ln.Addr().String(), "err", err)
				_ = ln.Close()
			}
			s.log.Info("public port closed", "addr", ln.Addr().String(), "exposure", reverse.DescribeKey(ln.key))
			return
		}
		if !s.acquire() {
			wire.Abort(c, wire.QUICRefused)
			s.log.Warn("public connection refused: too many connections", "remote", c.RemoteAddr().String(), "max_conns", s.lim().MaxConns)
			continue
		}
		if !s.addWorker() {
			s.release()
			wire.Abort(c, wire.QUICRefused)
			continue
		}
		go func() {
			defer s.wg.Done()
			defer s.release()
			s.servePublic(c, ln.key)
		}()
	}
}

// PublicSNI is the lookup for Config.Passthrough: the handler for a server name
// an agent exposes publicly. It does not guard tpd's own or the websites' names
// (registration refuses those through ReverseOptions.PublicSNI; tpd wraps the
// lookup in a guard as well).
func (s *Server) PublicSNI(serverName string) (func(context.Context, net.Conn), bool) {
	if s.rev == nil {
		return nil, false
	}
	k := "sni/" + serverName
	s.rev.mu.Lock()
	_, ok := s.rev.names[k]
	ok = ok || s.rev.peerServesSNI(k)
	s.rev.mu.Unlock()
	if !ok {
		return nil, false
	}
	return func(_ context.Context, c net.Conn) { s.servePublic(c, k) }, true
}

// servePublic relays one public connection to the agent that holds key. A public
// client has no TP identity: the agent's registration was what the policy
// allowed (expose_public), and it is re-checked while it lives.
func (s *Server) servePublic(c net.Conn, key string) {
	start := time.Now()
	remote := c.RemoteAddr().String()
	var up, down int64
	agent, end, outcome := "", "", "ok"
	defer func() {
		s.stats.session("tcp", authz.ActionExposePublic, outcome, up, down)
		s.log.LogAttrs(context.Background(), slog.LevelInfo, "public session",
			slog.String("remote", remote), slog.String("exposure", reverse.DescribeKey(key)), slog.String("agent", agent),
			slog.Int64("bytes_up", up), slog.Int64("bytes_down", down),
			slog.Duration("duration", time.Since(start)), slog.String("end", end))
		s.auditPublic(start, remote, "tcp", key, agent, up, down, end)
	}()
	a, label, ok := s.rev.lookupKey(key)
	if !ok && s.peers != nil {
		// Served by another instance, perhaps: carried there (peer_public.go).
		hdr := wire.SessionHeader{V: wire.Version, Session: newSessionID(), Public: key, PeerAddr: remote}
		pc, inst, herr := s.forwardPublic(s.force, key, hdr)
		if herr != nil {
			end, outcome = "refused: "+herr.Error(), herr.Code
			wire.Abort(c, wire.QUICPeerReset)
			return
		}
		agent = "peer " + inst
		var err error
		up, down, err = wire.Bridge(s.force, c, pc)
		end = "closed"
		if err != nil {
			end = err.Error()
		}
		return
	}
	if !ok {
		end, outcome = "refused: no agent online for it (reconnecting, or gone)", wire.CodeReverseOffline
		wire.Abort(c, wire.QUICPeerReset)
		return
	}
	agent = a.id.String() + " (" + a.transport + ")"
	ctx := a.ctx
	hdr := wire.SessionHeader{V: wire.Version, Session: newSessionID(), Name: label, Public: key, PeerAddr: remote}
	st, herr := a.open(ctx, hdr)
	if herr != nil {
		end, outcome = "refused: "+herr.Error(), herr.Code
		wire.Abort(c, wire.QUICPeerReset)
		return
	}
	var err error
	up, down, err = wire.Bridge(ctx, c, st)
	end = "closed"
	if err != nil {
		end = err.Error()
	}
}

// loadHolds reserves the saved holds for their owners for at least RestartGrace
// from now: an agent cannot reconnect while the server is down, and it may need
// its idle timeout and a reconnect backoff to notice that the server is back.
// Offline holds keep their own end when it is later. Only the owner's device
// can take a restored hold back (claim).
func (r *reverseRegistry) loadHolds(holds []reverse.Hold) {
	restart := time.Now().Add(r.opts.RestartGrace)
	for _, h := range holds {
		if h.Key == "" || h.Owner == "" {
			continue
		}
		until := h.Until
		if until.Before(restart) {
			until = restart
		}
		r.names[h.Key] = &revEntry{owner: h.Owner, label: h.Label, until: until}
	}
}

// persist hands a snapshot of the holds to ReverseOptions.SaveHolds, newest
// snapshot last even when several goroutines change the registry at once.
func (r *reverseRegistry) persist() {
	if r.opts.SaveHolds == nil {
		return
	}
	r.mu.Lock()
	now := time.Now()
	holds := make([]reverse.Hold, 0, len(r.names))
	for k, e := range r.names {
		h := reverse.Hold{Key: k, Owner: e.owner, Label: e.label}
		if e.agent == nil {
			if !now.Before(e.until) {
				continue
			}
			h.Until = e.until.UTC()
		}
		holds = append(holds, h)
	}
	r.seq++
	seq := r.seq
	r.mu.Unlock()
	r.saveMu.Lock()
	defer r.saveMu.Unlock()
	if seq > r.saved {
		r.opts.SaveHolds(holds)
		r.saved = seq
	}
}
