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
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// PeerOptions let this instance reach the reverse names other instances serve
// (Config.Peers). They need Config.Reverse.Store.
type PeerOptions struct {
	// Self is this instance's name, as the HoldStore records it.
	Self string
	// Route finds the instance that serves key now: its name, peer address
	// and the key's epoch there; ok is false when no instance serves it. It
	// may cache (invalidated when holds change); Forget drops what it cached
	// for key after a forward that found the route wrong.
	Route  func(ctx context.Context, key string) (PeerRoute, bool, error)
	Forget func(key string)
	// AgentRoutes lists, for an agent's pickup that reached this instance
	// while its session is pending elsewhere, the instances that serve the
	// agent's device now: one route per instance, with one of its reverse
	// names there (Key) and that name's epoch. Nil: pickups are not forwarded.
	AgentRoutes func(ctx context.Context, deviceID string) ([]PeerRoute, error)
	// ServerTLS accepts peer connections (ALPN tp-peer/1): its
	// VerifyConnection must accept node certificates only. ClientTLS is the
	// configuration that dials instance (VerifyConnection must accept only that
	// instance's node certificate).
	ServerTLS *tls.Config
	ClientTLS func(instance string) *tls.Config
	// Dial opens the TCP connection to a peer address; nil uses net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// InstanceAddr is the peer address of a running instance (by name), to
	// tell the instance that forwarded a session why it ends; nil: not told.
	InstanceAddr func(ctx context.Context, instance string) (string, error)
	// Idle is how many handshaken connections are kept ready per peer (a new
	// session then costs no handshake). Default 2; negative keeps none.
	Idle int
}

// PeerRoute is where a key is served: by Instance, reachable at Addr
// (host:port of its shared port), at Epoch.
type PeerRoute struct {
	Instance, Addr string
	Epoch          int64
	// DevicesOnly: the key is a reverse HTTP name its exposer opened to
	// enrolled devices only (AccessHoldStore recorded it with the claim).
	DevicesOnly bool
	// Key is the name the route is for (AgentRoutes only).
	Key string
}

const (
	// peerIdleMax is how long a ready peer connection waits in the pool; the
	// serving side waits peerOpenWait for its open, which is longer, so a
	// pooled connection is never one the other side already dropped for idling.
	peerIdleMax  = 20 * time.Second
	peerOpenWait = 45 * time.Second
	// maxPeers bounds the pools (one per peer instance).
	maxPeers = 256
)

// CodePeerUnreachable is never sent: a forward that cannot reach the serving
// instance answers reverse_offline (the agent may be moving), with this reason.
const peerUnreachable = "the TP server instance %s that serves %s cannot be reached (%v); try again in a few seconds"

type peerState struct {
	opts PeerOptions
	live peerLive // forwarded dials live here, for end notices (peer_end.go)
	mu   sync.Mutex
	idle map[string]chan *pooledConn // instance+addr → ready connections
	done bool
}

type pooledConn struct {
	conn  *tls.Conn
	since time.Time
}

func newPeerState(o *PeerOptions) *peerState {
	if o == nil {
		return nil
	}
	opts := *o
	if opts.Idle == 0 {
		opts.Idle = 2
	}
	if opts.Dial == nil {
		var d net.Dialer
		opts.Dial = d.DialContext
	}
	return &peerState{opts: opts, idle: map[string]chan *pooledConn{}}
}

// serverTLS is the configuration for a ClientHello offering tp-peer/1.
func (p *peerState) serverTLS() *tls.Config {
	c := p.opts.ServerTLS.Clone()
	c.MinVersion, c.MaxVersion = tls.VersionTLS13, 0
	c.NextProtos = []string{wire.PeerALPN}
	c.SessionTicketsDisabled = true // a peer's node certificate is checked on every connection
	return c
}

// close drops the ready connections; later ones are not kept.
func (p *peerState) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done = true
	for k, ch := range p.idle {
		close(ch)
		for pc := range ch {
			_ = pc.conn.Close()
		}
		delete(p.idle, k)
	}
}

// dial opens a handshaken peer connection to r.
func (p *peerState) dial(ctx context.Context, r PeerRoute) (*tls.Conn, error) {
	raw, err := p.opts.Dial(ctx, "tcp", r.Addr)
	if err != nil {
		return nil, err
	}
	cfg := p.opts.ClientTLS(r.Instance).Clone()
	cfg.NextProtos = []string{wire.PeerALPN}
	cfg.MinVersion = tls.VersionTLS13
	conn := tls.Client(wire.NewEOFConn(raw), cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, err
	}
	if conn.ConnectionState().NegotiatedProtocol != wire.PeerALPN {
		_ = conn.Close()
		return nil, fmt.Errorf("the instance at %s does not speak %s (is it an older tpd, or not tpd?)", r.Addr, wire.PeerALPN)
	}
	return conn, nil
}

// get returns a ready connection to r (pooled says it waited in the pool) and
// has the pool refilled in the background.
func (p *peerState) get(ctx context.Context, r PeerRoute) (conn *tls.Conn, pooled bool, err error) {
	k := r.Instance + "\x00" + r.Addr
	p.mu.Lock()
	ch := p.idle[k]
	if ch == nil && !p.done && p.opts.Idle > 0 && len(p.idle) < maxPeers {
		ch = make(chan *pooledConn, p.opts.Idle)
		p.idle[k] = ch
	}
	p.mu.Unlock()
	if ch != nil {
		defer p.refill(ch, k, r)
	}
	for ch != nil {
		select {
		case pc, ok := <-ch:
			if !ok {
				ch = nil
				break
			}
			if time.Since(pc.since) < peerIdleMax {
				return pc.conn, true, nil
			}
			_ = pc.conn.Close()
			continue
		default:
			ch = nil
		}
	}
	conn, err = p.dial(ctx, r)
	return conn, false, err
}

// refill tops ch up with one connection, in the background, bounded by
// peerIdleMax; a failure keeps nothing (the next session dials).
func (p *peerState) refill(ch chan *pooledConn, k string, r PeerRoute) {
	if len(ch) >= cap(ch) {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), peerIdleMax)
		defer cancel()
		conn, err := p.dial(ctx, r)
		if err != nil {
			return
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.done || p.idle[k] != ch {
			_ = conn.Close()
			return
		}
		select {
		case ch <- &pooledConn{conn: conn, since: time.Now()}:
		default:
			_ = conn.Close()
		}
	}()
}

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
	route, ok, err := p.opts.Route(rctx, key)
	cancel()
	switch {
	case err != nil:
		s.rev.logStoreErr("route", err)
		return PeerRoute{}, false, wire.Errorf(wire.CodeReverseOffline, "this TP server instance cannot look up which instance serves %s just now (its database is unreachable); try again in a few seconds", describeKey(key))
	case !ok || route.Instance == p.opts.Self:
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
		if herr != nil && herr.Code == wire.CodeReverseOffline && p.opts.Forget != nil {
			p.opts.Forget(key)
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
	conn, pooled, err := s.peers.get(dctx, route)
	cancel()
	if err != nil {
		return nil, false, false, wire.Errorf(wire.CodeReverseOffline, peerUnreachable, route.Instance, describeKey(host), err)
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
		return nil, false, pooled, wire.Errorf(wire.CodeReverseOffline, peerUnreachable, route.Instance, describeKey(host), err)
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
		label, ok := r.name(op.Key)
		if !ok || label != op.Header.Name {
			return nil, false, wire.Errorf(wire.CodeBadRequest, "peer open for %s names label %q", op.Key, op.Header.Name)
		}
	}
	r.mu.Lock()
	e := r.names[op.Key]
	now := time.Now()
	var a *reverseAgent
	label := ""
	if e != nil && e.agent != nil && e.epoch == op.Epoch && r.currentLocked(op.Key, e, now) {
		a, label = e.agent, e.label
	}
	r.mu.Unlock()
	if a == nil {
		return nil, false, wire.Errorf(wire.CodeReverseOffline, "the TP server instance that served %s no longer serves it at epoch %d (its agent moved or reconnects, or its lease ran out); try again in a few seconds", describeKey(op.Key), op.Epoch)
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
		st, herr := a.open(ctx, hdr)
		if herr != nil {
			return nil, false, herr
		}
		return st, false, nil
	}
	want := ""
	if netOfFull(a, op.Key) == "udp" {
		want = "udp"
	}
	if want != op.Header.Net {
		return nil, false, wire.Errorf(wire.CodeUnsupportedNetwork, "%s serves %s; dial it %s", op.Key, map[string]string{"": "TCP", "udp": "UDP"}[want], map[string]string{"": "without --udp", "udp": "with --udp (tp forward --udp)"}[want])
	}
	st, herr := a.open(ctx, op.Header)
	if herr != nil {
		return nil, false, herr
	}
	return st, !a.isPublic(op.Key), nil
}
