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
	"net"
	"strconv"
	"strings"

	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"
)

// maxPeerPublic bounds the public keys of other instances this one follows.
const maxPeerPublic = 4096

// peerPublic is what this instance knows of the public exposures other
// instances serve. Lock order: reverseRegistry.mu, then mu.
type peerPublic struct {
	keys   map[string]bool            // "tcp/PORT", "udp/PORT", "sni/NAME" served elsewhere
	lns    map[string]*publicListener // ports open here for them (not an agent's here)
	failed map[string]bool            // ports that could not be opened (logged once)
}

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
	want := make(map[string]bool, len(keys))
	for _, k := range keys {
		if _, ok := wire.PublicKeyNet(k); ok && len(want) < maxPeerPublic {
			want[k] = true
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	pp := &r.peerPub
	if pp.lns == nil {
		pp.lns, pp.failed = map[string]*publicListener{}, map[string]bool{}
	}
	pp.keys = want
	for k, ln := range pp.lns {
		if !want[k] {
			delete(pp.lns, k)
			s.untrack(ln)
		}
	}
	for k := range want {
		netw, port, ok := publicPort(k)
		if !ok || pp.lns[k] != nil {
			continue
		}
		if e := r.names[k]; e != nil && e.ln != nil {
			continue // open for an agent here (or its grace period); it serves both
		}
		if r.opts.PublicPorts == nil || !r.opts.PublicPorts(netw, port) {
			if !pp.failed[k] {
				pp.failed[k] = true
				s.log.Warn("peering: another instance serves a public port this instance may not open (public-ports differ between instances); connections for it that reach this instance are refused",
					"exposure", reverse.DescribeKey(k))
			}
			continue
		}
		pl, err := listenPublic(r.opts.PublicHost, netw, port, k)
		if err != nil {
			if !pp.failed[k] {
				pp.failed[k] = true
				s.log.Warn("peering: cannot open a public port another instance serves; connections for it that reach this instance are refused", "exposure", reverse.DescribeKey(k), "err", err)
			}
			continue
		}
		delete(pp.failed, k)
		if !s.track(pl) {
			_ = pl.Close()
			return
		}
		pp.lns[k] = pl
		go s.acceptPublic(pl)
	}
}

// publicPort splits a "tcp/PORT" or "udp/PORT" key.
func publicPort(k string) (string, int, bool) {
	netw, rest, _ := strings.Cut(k, "/")
	if netw != "tcp" && netw != "udp" {
		return "", 0, false
	}
	port, err := strconv.Atoi(rest)
	return netw, port, err == nil
}

// listenPublic opens the socket of a public port.
func listenPublic(host, netw string, port int, key string) (*publicListener, error) {
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	pl := &publicListener{key: key}
	var err error
	if netw == "udp" {
		var ua *net.UDPAddr
		if ua, err = net.ResolveUDPAddr("udp", addr); err == nil {
			pl.pc, err = net.ListenUDP("udp", ua)
		}
	} else {
		pl.Listener, err = net.Listen("tcp", addr)
	}
	return pl, err
}

// takePeerListenerLocked hands the port this instance keeps open for another
// instance's key over to an agent registering the key here (it is already
// being served: the accept loop finds the local agent first). Called with
// r.mu held.
func (r *reverseRegistry) takePeerListenerLocked(k string) *publicListener {
	ln := r.peerPub.lns[k]
	delete(r.peerPub.lns, k)
	return ln
}

// keepForPeerLocked takes over the listener of a local entry that is dropped
// while another instance serves its key, so the port stays open; it reports
// whether it did. Called with r.mu held.
func (r *reverseRegistry) keepForPeerLocked(k string, ln *publicListener) bool {
	if !r.peerPub.keys[k] || r.peerPub.lns == nil || r.peerPub.lns[k] != nil {
		return false
	}
	r.peerPub.lns[k] = ln
	return true
}

// peerServesSNI reports whether another instance serves the pass-through name key.
func (r *reverseRegistry) peerServesSNI(k string) bool {
	return r.peerPub.keys[k]
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
