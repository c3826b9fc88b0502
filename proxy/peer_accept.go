package proxy

// Pickups across instances (docs/SCALE.md, "Peering"): an agent over TLS picks
// each announced session up on a new connection (op accept), and a load
// balancer may send that connection to an instance (B) that does not hold the
// agent's control session. B then asks the database which instances serve the
// agent's device (PeerOptions.AgentRoutes) and offers the pickup to each over a
// peer connection (net "accept", the pending session's id, the agent's device
// as B authenticated it, one of the device's names at its epoch). The instance
// (A) where an agent of that device holds that name at that epoch, and that
// has the session pending for that device (maybe for another of its agents),
// answers ok and takes the peer connection as the
// agent's stream; B answers the agent ok and relays the two.

import (
	"context"
	"time"

	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"
)

// maxAcceptRoutes bounds the instances a pickup is offered to.
const maxAcceptRoutes = 8

// forwardAccept offers an accept for a session not pending here to the
// instances that serve the agent's device. handled is false when no other
// instance took it (the local refusal stands).
func (s *Server) forwardAccept(ctx context.Context, conn wire.Stream, ss *session, hello wire.ClientHello) (handled bool) {
	p := s.peers
	if p == nil || p.Options().AgentRoutes == nil {
		return false
	}
	lim := s.lim()
	rctx, cancel := context.WithTimeout(ctx, lim.DialTimeout)
	routes, err := p.Options().AgentRoutes(rctx, ss.id.DeviceID)
	cancel()
	if err != nil {
		s.rev.LogStoreErr("agent routes", err)
		return false
	}
	for i, route := range routes {
		if i == maxAcceptRoutes {
			break
		}
		if route.Instance == p.Options().Self {
			continue
		}
		label, ok := s.rev.Name(route.Key)
		if !ok {
			continue
		}
		hdr := wire.SessionHeader{V: wire.Version, Session: hello.Session, Name: label, Net: wire.NetAccept, PeerID: ss.id.DeviceID}
		pc, _, herr := s.forwardTo(ctx, route, route.Key, hdr)
		if herr != nil {
			continue
		}
		ss.dest = "accept " + hello.Session
		ss.upstream = "peer " + route.Instance + " (" + route.Addr + ")"
		_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
		if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true}); err != nil {
			ss.end = "writing server hello: " + err.Error()
			wire.Abort(pc, wire.QUICPeerReset)
			_ = conn.Close()
			return true
		}
		_ = conn.SetWriteDeadline(time.Time{})
		up, down, err := wire.Bridge(ctx, conn, pc)
		ss.up, ss.down = up, down
		ss.end = "paired session ended (through a peer)"
		if err != nil {
			ss.end = err.Error()
		}
		return true
	}
	return false
}

// servePeerAccept takes a pickup another instance received for a session
// pending here (see the file comment), or refuses it.
func (s *Server) servePeerAccept(ctx context.Context, conn wire.Stream, op wire.PeerOpen, peer string) {
	r := s.rev
	herr := func() *wire.HelloError {
		if r == nil {
			return wire.Errorf(wire.CodeReverseUnknown, "this TP server instance serves no reverse names")
		}
		return nil
	}()
	var p *reverse.Pending
	if herr == nil {
		p = r.PeerPending(op.Header.Session, op.Header.PeerID, op.Key, op.Epoch)
		if p == nil {
			herr = wire.Errorf(wire.CodeUnknownSession, "session %s is not waiting for %s on this TP server instance", op.Header.Session, op.Header.PeerID)
		}
	}
	if herr != nil {
		s.stats.peerIn(false)
		s.refuse(conn, herr)
		return
	}
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true}); err != nil {
		_ = conn.Close()
		return
	}
	_ = conn.SetWriteDeadline(time.Time{})
	s.stats.peerIn(true)
	s.stats.peerActive[peerDirIn].Add(1)
	defer s.stats.peerActive[peerDirIn].Add(-1)
	start := time.Now()
	end := "paired session ended"
	if ps, ok := r.Pair(p, conn); !ok {
		end = "the session expired before it was accepted"
		_ = conn.Close()
	} else {
		select {
		case <-ps.Done():
		case <-ctx.Done():
			end = context.Cause(ctx).Error()
			_ = ps.Close()
		}
	}
	s.log.Info("peer session", "peer", peer, "name", op.Key, "epoch", op.Epoch, "accept", op.Header.Session, "agent", op.Header.PeerID,
		"duration", time.Since(start), "end", end)
}
