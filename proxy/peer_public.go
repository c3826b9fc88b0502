package proxy

// Public exposures across instances (docs/SCALE.md, "Peering"): a public TCP
// or UDP port, or a pass-through server name, held by an agent on instance A
// is reachable when the public client's connection lands on instance B. B
// learns which public keys other instances serve (SetPeerPublic, from the
// database: tpd refreshes it on every holds notification and every renewal
// period), keeps those ports open itself, and routes their server names; a
// connection (or a public UDP client) that finds no local agent is carried to
// the serving instance over a peer connection, with the route's epoch, as a
// dial is. A refuses a stale epoch; B then resets the public connection.

import (
	"context"

	"github.com/tp-proxy/tp/proxy/wire"
)

// SetPeerPublic tells the server which public exposures other instances serve
// now (keys as reverse.Hold.Key: "tcp/PORT", "udp/PORT", "sni/NAME"). It opens
// the public ports among them that are not open here yet (and that public-ports
// allows here) and closes those it had opened for keys no longer listed. Without
// PeerOptions it does nothing.
func (s *Server) SetPeerPublic(keys []string) {
	r := s.rev
	if s.peers == nil || r == nil {
		return
	}
	r.SetPeerPublic(keys)
}

// forwardPublic opens a public session for key on the instance that serves
// it; inst names that instance for the log.
func (s *Server) forwardPublic(ctx context.Context, key string, hdr wire.SessionHeader) (st wire.Stream, inst string, herr *wire.HelloError) {
	if s.peers == nil {
		return nil, "", wire.Errorf(wire.CodeReverseOffline, "no agent online for it (reconnecting, or gone)")
	}
	route, ok, herr := s.peerRoute(ctx, key)
	switch {
	case herr != nil:
		return nil, "", herr
	case !ok:
		return nil, "", wire.Errorf(wire.CodeReverseOffline, "no agent online for it on any instance (reconnecting, or gone)")
	}
	conn, _, herr := s.forwardTo(ctx, route, key, hdr)
	if herr != nil {
		return nil, route.Instance, herr
	}
	return conn.(*peerCounted), route.Instance, nil
}
