package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
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

// publicClaims decides an agent's public exposures: the administrator's bounds
// first (public-ports, refused server names), then the policy with action
// expose_public. It returns the claims and the requests to re-check while live.
func (s *Server) publicClaims(ctx context.Context, ss *session, hello wire.ClientHello, transport string) ([]reverse.PublicClaim, []authz.Request, *wire.HelloError) {
	o := s.rev.opts
	var claims []reverse.PublicClaim
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
		claims = append(claims, reverse.PublicClaim{PublicSpec: p, Full: full})
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
			if _, public := ln.(*reverse.PublicListener); !public {
				return a.Port
			}
		}
	}
	return 443
}

// acceptPublic serves a public port until its listener closes.
func (s *Server) acceptPublic(ln *reverse.PublicListener) {
	if !ln.Serving() {
		return // a port kept open for another instance, taken over by an agent here
	}
	if ln.PC != nil {
		s.servePublicUDP(ln)
		return
	}
	s.log.Info("public port open", "addr", ln.Addr().String(), "exposure", reverse.DescribeKey(ln.Key))
	for {
		c, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Warn("public port accept failed; closing it", "addr", ln.Addr().String(), "err", err)
				_ = ln.Close()
			}
			s.log.Info("public port closed", "addr", ln.Addr().String(), "exposure", reverse.DescribeKey(ln.Key))
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
			s.servePublic(c, ln.Key)
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
	if !s.rev.PassesThrough(k) {
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
	a, label, ok := s.rev.LookupKey(key)
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
	agent = a.ID.String() + " (" + a.Transport + ")"
	ctx := a.Ctx
	hdr := wire.SessionHeader{V: wire.Version, Session: newSessionID(), Name: label, Public: key, PeerAddr: remote}
	st, herr := a.Open(ctx, hdr)
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
