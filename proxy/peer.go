package proxy

// Peering: a dial that lands on this instance (B) for a reverse name whose
// agent is on another instance (A) is authorised here, as any dial, and then
// carried to A over a peer connection: TLS 1.3 on the shared port with ALPN
// tp-peer/1, both sides presenting node certificates of TP's own CA. A opens
// the session to its agent only if the epoch B read with the route is the one
// its agent holds and its lease is current (the fencing token), so a forward
// decided on a stale view is refused (reverse_offline), never served by the
// wrong agent. Protected names stay end to end: A and B relay the dialer's TLS
// with the agent as opaque bytes. docs/SCALE.md, "Peering", says why a peer
// connection carries one session (TCP+TLS, not a multiplexed one).

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"time"

	"github.com/tp-proxy/tp/proxy/peer"
	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// PeerOptions let this instance reach the reverse names other instances serve
// (Config.Peers, peer.Options). They need Config.Reverse.Store.
type PeerOptions = peer.Options

// PeerRoute is where a key is served (peer.Route).
type PeerRoute = peer.Route

// peerOpenWait is how long a peer connection may take to send its open
// (longer than a pooled connection waits: peer.OpenWait).
const peerOpenWait = peer.OpenWait

// CodePeerUnreachable is never sent: a forward that cannot reach the serving
// instance answers reverse_offline (the agent may be moving), with this reason.
const peerUnreachable = "the TP server instance %s that serves %s cannot be reached (%v); try again in a few seconds"

// forward carries a dial of host, authorised here, to the instance that
// serves it. handled is false when no other instance does (the local answer
// stands). e2e says the name is protected (the dialer runs TLS with the agent).
func (s *Server) forward(ctx context.Context, ss *session, host string, hdr wire.SessionHeader) (conn net.Conn, e2e, handled bool, herr *wire.HelloError) {
	if s.peers == nil {
		return nil, false, false, nil
	}
	route, ok, herr := s.peerRoute(ctx, host)
	switch {
	case herr != nil:
		return nil, false, true, herr
	case !ok:
		return nil, false, false, nil
	}
	if herr := s.rev.acquirePending(ss.id); herr != nil {
		return nil, false, true, herr
	}
	defer s.rev.pendingPerID.release(ss.id.DeviceID)
	ss.upstream = "peer " + route.Instance + " (" + route.Addr + ")"
	conn, e2e, herr = s.forwardTo(ctx, route, host, hdr)
	if herr == nil {
		ss.peerSID, ss.peerInstance = hdr.Session, route.Instance
	}
	return conn, e2e, true, herr
}

// peerRoute finds the other instance that serves key; ok is false when none
// does (or this one does).
func (s *Server) peerRoute(ctx context.Context, key string) (PeerRoute, bool, *wire.HelloError) {
	p := s.peers
	rctx, cancel := context.WithTimeout(ctx, s.lim().DialTimeout)
	route, ok, err := p.Options().Route(rctx, key)
	cancel()
	switch {
	case err != nil:
		s.rev.LogStoreErr("route", err)
		return PeerRoute{}, false, wire.Errorf(wire.CodeReverseOffline, "this TP server instance cannot look up which instance serves %s just now (its database is unreachable); try again in a few seconds", reverse.DescribeKey(key))
	case !ok || route.Instance == p.Options().Self:
		return PeerRoute{}, false, nil
	}
	return route, true, nil
}

// forwardTo opens a session for key on route's instance; a pooled connection
// that fails before the peer answers is retried once on a fresh one, and a
// route found stale is forgotten.
func (s *Server) forwardTo(ctx context.Context, route PeerRoute, key string, hdr wire.SessionHeader) (net.Conn, bool, *wire.HelloError) {
	p := s.peers
	for attempt := 0; ; attempt++ {
		conn, e2e, retry, herr := s.forwardOnce(ctx, route, key, hdr)
		if herr != nil && retry && attempt == 0 {
			continue // a pooled connection the peer had closed: once more on a fresh one
		}
		if herr != nil && herr.Code == wire.CodeReverseOffline && p.Options().Forget != nil {
			p.Options().Forget(key)
		}
		s.stats.peerOut(herr == nil)
		if herr == nil {
			conn = newPeerCounted(conn, &s.stats.peerActive[peerDirOut])
		}
		return conn, e2e, herr
	}
}

// forwardOnce opens one session on a peer connection. retry says the
// connection came from the pool and failed before the peer answered.
func (s *Server) forwardOnce(ctx context.Context, route PeerRoute, host string, hdr wire.SessionHeader) (net.Conn, bool, bool, *wire.HelloError) {
	lim := s.lim()
	dctx, cancel := context.WithTimeout(ctx, lim.DialTimeout)
	conn, pooled, err := s.peers.Get(dctx, route)
	cancel()
	if err != nil {
		return nil, false, false, wire.Errorf(wire.CodeReverseOffline, peerUnreachable, route.Instance, reverse.DescribeKey(host), err)
	}
	// The peer waits for its agent to pick the session up (PickupTimeout) after
	// the dial timeout's worth of set-up.
	_ = conn.SetDeadline(time.Now().Add(lim.DialTimeout + s.rev.opts.PickupTimeout))
	err = wire.WritePeerOpen(conn, wire.PeerOpen{V: wire.Version, Key: host, Epoch: route.Epoch, Header: hdr})
	var sh wire.ServerHello
	if err == nil {
		sh, err = wire.ReadServerHello(conn)
	}
	if err != nil {
		_ = conn.Close()
		var he *wire.HelloError
		if errors.As(err, &he) {
			return nil, false, false, he
		}
		return nil, false, pooled, wire.Errorf(wire.CodeReverseOffline, peerUnreachable, route.Instance, reverse.DescribeKey(host), err)
	}
	if !sh.OK {
		_ = conn.Close()
		return nil, false, false, &wire.HelloError{Code: sh.Code, Reason: sh.Reason}
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, sh.E2E, false, nil
}

// servePeer serves one peer connection (ALPN tp-peer/1, node certificate
// verified by PeerOptions.ServerTLS): one PeerOpen, the answer, then the
// session's bytes, relayed to the agent until either side ends.
func (s *Server) servePeer(ctx context.Context, conn *tls.Conn) {
	start := time.Now()
	peer := "?"
	if cs := conn.ConnectionState(); len(cs.PeerCertificates) > 0 {
		peer, _ = authz.NodeName(cs.PeerCertificates[0])
	}
	_ = conn.SetReadDeadline(time.Now().Add(peerOpenWait))
	stopDrain := s.cutReadOnDrain(conn)
	op, err := wire.ReadPeerOpen(conn)
	stopDrain()
	if err != nil {
		var he *wire.HelloError
		if errors.As(err, &he) {
			s.stats.peerIn(false)
			s.refuse(conn, he)
			s.log.Warn("peer session refused", "peer", peer, "err", he.Error())
			return
		}
		_ = conn.Close() // an unused pooled connection, or the peer went away
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	switch op.Header.Net {
	case wire.NetHTTP:
		s.servePeerHTTP(ctx, conn, op, peer)
		return
	case wire.NetAccept:
		s.servePeerAccept(ctx, conn, op, peer)
		return
	case wire.NetEnd:
		s.stats.peerIn(true)
		s.servePeerEnd(conn, op, peer)
		return
	}
	st, e2e, herr := s.peerOpen(ctx, op)
	if herr != nil {
		s.stats.peerIn(false)
		s.refuse(conn, herr)
		s.log.Info("peer session refused", "peer", peer, "name", op.Key, "epoch", op.Epoch, "dialer", op.Header.PeerID, "code", herr.Code, "reason", herr.Reason)
		return
	}
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true, E2E: e2e}); err != nil {
		wire.Abort(st, wire.QUICPeerReset)
		_ = conn.Close()
		return
	}
	_ = conn.SetWriteDeadline(time.Time{})
	s.stats.peerIn(true)
	s.stats.peerActive[peerDirIn].Add(1)
	defer s.stats.peerActive[peerDirIn].Add(-1)
	if qs, ok := st.(*wire.QUICStream); ok {
		defer s.holds.hold(qs.Conn())() // a drain keeps the agent's connection for it
	}
	up, down, err := wire.BridgeNotify(ctx, conn, st, func(error) {
		// s.force, not ctx: the forced shutdown also cuts the agent's side,
		// on another connection whose cut may reach this bridge before ctx's.
		if s.force.Err() != nil && op.Header.PeerID != "" {
			s.notifyPeerEnd(peer, op) // this instance stops: the dialer learns why
		}
	})
	end := "closed"
	if err != nil {
		end = err.Error()
	}
	s.log.Info("peer session", "peer", peer, "name", op.Key, "epoch", op.Epoch, "dialer", op.Header.PeerID,
		"bytes_up", up, "bytes_down", down, "duration", time.Since(start), "end", end)
}

// peerOpen opens a session to the agent that serves op.Key here, if op.Epoch
// is the epoch it holds and this instance's lease is current.
func (s *Server) peerOpen(ctx context.Context, op wire.PeerOpen) (wire.Stream, bool, *wire.HelloError) {
	r := s.rev
	if r == nil {
		return nil, false, wire.Errorf(wire.CodeReverseUnknown, "this TP server instance serves no reverse names")
	}
	pubNet, public := wire.PublicKeyNet(op.Key)
	if !public {
		label, ok := r.Name(op.Key)
		if !ok || label != op.Header.Name {
			return nil, false, wire.Errorf(wire.CodeBadRequest, "peer open for %s names label %q", op.Key, op.Header.Name)
		}
	}
	a, label := r.LookupEpoch(op.Key, op.Epoch)
	if a == nil {
		return nil, false, wire.Errorf(wire.CodeReverseOffline, "the TP server instance that served %s no longer serves it at epoch %d (its agent moved or reconnects, or its lease ran out); try again in a few seconds", reverse.DescribeKey(op.Key), op.Epoch)
	}
	if public {
		// A public client's session: the label is the one the agent registered
		// for this exposure; the network follows from the key (checked by
		// ReadPeerOpen). No inner TLS.
		hdr := op.Header
		hdr.Name = label
		if pubNet == "udp" {
			hdr.Net = "udp" // capsules on the stream, relayed as bytes (no flow id)
		}
		st, herr := a.Open(ctx, hdr)
		if herr != nil {
			return nil, false, herr
		}
		return st, false, nil
	}
	want := ""
	if a.Network(op.Key) == "udp" {
		want = "udp"
	}
	if want != op.Header.Net {
		return nil, false, wire.Errorf(wire.CodeUnsupportedNetwork, "%s serves %s; dial it %s", op.Key, map[string]string{"": "TCP", "udp": "UDP"}[want], map[string]string{"": "without --udp", "udp": "with --udp (tp forward --udp)"}[want])
	}
	st, herr := a.Open(ctx, op.Header)
	if herr != nil {
		return nil, false, herr
	}
	return st, !a.IsPublic(op.Key), nil
}
