package proxy

// The reason of a cut across a peer hop (docs/SCALE.md, "Peering"): when the
// serving instance (A) cuts a session it carries for another instance (B)
// because it is shutting down, it first tells B on a fresh peer connection
// (net "end", the session's id, end "shutdown"), bounded by peerEndWait. B
// cuts the dialer's session itself with the shutdown code and records that
// reason for op "why"; A then resets the peer connection as before. A notice
// that cannot be delivered costs only the reason: the dialer still sees an
// abort (peer_reset).

import (
	"context"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// peerEndWait bounds telling the forwarding instance why a session ends.
const peerEndWait = 2 * time.Second

// maxPeerLive bounds the forwarded sessions an instance remembers for
// notices; past it a session is relayed without (its cut says peer_reset).
const maxPeerLive = 1 << 16

// peerLive is the forwarded dials live here, by session id, with the function
// that cuts each with a cause.
type peerLive struct {
	mu sync.Mutex
	m  map[string]liveForward
}

type liveForward struct {
	instance string // where it was forwarded: only that instance may end it
	cut      context.CancelCauseFunc
}

// track records a session forwarded to instance, and its cut, until the
// returned function runs.
func (l *peerLive) track(sid, instance string, cut context.CancelCauseFunc) func() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string]liveForward{}
	}
	if _, dup := l.m[sid]; dup || len(l.m) >= maxPeerLive {
		return func() {}
	}
	l.m[sid] = liveForward{instance: instance, cut: cut}
	return func() {
		l.mu.Lock()
		delete(l.m, sid)
		l.mu.Unlock()
	}
}

// take returns the cut of session sid if it was forwarded to instance.
func (l *peerLive) take(sid, instance string) context.CancelCauseFunc {
	l.mu.Lock()
	defer l.mu.Unlock()
	f, ok := l.m[sid]
	if !ok || f.instance != instance {
		return nil
	}
	delete(l.m, sid)
	return f.cut
}

// notifyPeerEnd tells instance peer, which forwarded op, that its session ends
// because this instance shuts down. Bounded by peerEndWait.
func (s *Server) notifyPeerEnd(peer string, op wire.PeerOpen) {
	p := s.peers
	if p == nil || p.Options().InstanceAddr == nil || op.Header.Session == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), peerEndWait)
	defer cancel()
	addr, err := p.Options().InstanceAddr(ctx, peer)
	if err != nil || addr == "" {
		return
	}
	conn, err := p.Dial(ctx, PeerRoute{Instance: peer, Addr: addr})
	if err != nil {
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(peerEndWait))
	hdr := wire.SessionHeader{V: wire.Version, Session: op.Header.Session, Name: op.Header.Name, Net: wire.NetEnd, End: wire.EndShutdown}
	if err := wire.WritePeerOpen(conn, wire.PeerOpen{V: wire.Version, Key: op.Key, Epoch: op.Epoch, Header: hdr}); err != nil {
		return
	}
	_, _ = wire.ReadServerHello(conn) // delivered (or refused: the session already ended there)
}

// servePeerEnd takes another instance's notice that a session it serves for
// this one ends because it shuts down: the dialer's session is cut here with
// that reason.
func (s *Server) servePeerEnd(conn wire.Stream, op wire.PeerOpen, peer string) {
	cut := s.peerLive.take(op.Header.Session, peer)
	if cut == nil {
		s.refuse(conn, wire.Errorf(wire.CodeUnknownSession, "no session %s is forwarded from here to %s", op.Header.Session, peer))
		return
	}
	cut(&wire.EndError{Code: wire.QUICShutdown, By: "server",
		Reason: "the TP server instance that served " + op.Key + " is shutting down; reconnect (its agent moves to another instance)"})
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	_ = wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true})
	_ = conn.Close()
	s.log.Info("peer session ended by its serving instance", "peer", peer, "name", op.Key, "session", op.Header.Session, "end", op.Header.End)
}
