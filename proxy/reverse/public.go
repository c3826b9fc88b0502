package reverse

// Public mode of reverse listeners (docs/PROTOCOL.md, section 11.5): the
// public ports and pass-through server names agents hold, the ports kept open
// for the exposures other instances serve, and the holds saved across
// restarts.

import (
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// PublicListener is a public TCP port (Listener) or UDP port (PC) the server
// opened for an agent, or for another instance's agent; Key is its registry
// key.
type PublicListener struct {
	net.Listener
	PC      *net.UDPConn
	Key     string
	serving atomic.Bool // Hooks.Serve runs for it
}

// Serving reports, the first time only, that the listener is now served: a
// port kept open for another instance and taken over by an agent here is
// served by the loop that already runs.
func (p *PublicListener) Serving() bool {
	return p.serving.CompareAndSwap(false, true)
}

// Close closes the port.
func (p *PublicListener) Close() error {
	if p.PC != nil {
		return p.PC.Close()
	}
	return p.Listener.Close()
}

// Addr is the port's address.
func (p *PublicListener) Addr() net.Addr {
	if p.PC != nil {
		return p.PC.LocalAddr()
	}
	return p.Listener.Addr()
}

// openPublic opens the listeners a's claims need and that are not open yet.
// Called with r.mu held, before a's entries are recorded.
func (r *Registry) openPublic(a *Agent) (map[string]*PublicListener, *wire.HelloError) {
	opened := map[string]*PublicListener{}
	fail := func(herr *wire.HelloError) (map[string]*PublicListener, *wire.HelloError) {
		for _, ln := range opened {
			r.hooks.Untrack(ln)
		}
		return nil, herr
	}
	for _, p := range a.Public {
		if p.Port == 0 {
			continue
		}
		if e := r.names[p.Key()]; e != nil && e.ln != nil {
			continue
		}
		if ln := r.takePeerListenerLocked(p.Key()); ln != nil {
			// Open already for another instance's agent: its accept loop
			// runs on (Serving reports it) and finds this
			// agent first.
			opened[p.Key()] = ln
			continue
		}
		pl, err := listenPublic(r.opts.PublicHost, p.Net, p.Port, p.Key())
		if err != nil {
			return fail(wire.Errorf(wire.CodePublicRefused, "the TP server cannot open public %s port %d: %v", strings.ToUpper(p.Net), p.Port, err))
		}
		if r.hooks.Track == nil || !r.hooks.Track(pl) {
			_ = pl.Close()
			return fail(wire.Errorf(wire.CodePublicRefused, "the TP server is shutting down"))
		}
		opened[p.Key()] = pl
	}
	return opened, nil
}

// dropLocked forgets entry k and closes its listener. Called with r.mu held.
func (r *Registry) dropLocked(k string, e *entry) {
	if e.timer != nil {
		e.timer.Stop()
	}
	if e.ln != nil && !r.keepForPeerLocked(k, e.ln) {
		r.hooks.Untrack(e.ln)
	}
	delete(r.names, k)
}

// expire ends the grace period of k: its listener closes and the hold is forgotten.
func (r *Registry) expire(k string, e *entry) {
	r.mu.Lock()
	if r.names[k] == e && e.agent == nil {
		r.dropLocked(k, e)
	}
	r.mu.Unlock()
	r.persist()
}

// loadHolds reserves the saved holds for their owners for at least RestartGrace
// from now: an agent cannot reconnect while the server is down, and it may need
// its idle timeout and a reconnect backoff to notice that the server is back.
// Offline holds keep their own end when it is later. Only the owner's device
// can take a restored hold back (claim).
func (r *Registry) loadHolds(holds []Hold) {
	restart := time.Now().Add(r.opts.RestartGrace)
	for _, h := range holds {
		if h.Key == "" || h.Owner == "" {
			continue
		}
		until := h.Until
		if until.Before(restart) {
			until = restart
		}
		r.names[h.Key] = &entry{owner: h.Owner, label: h.Label, until: until}
	}
}

// persist hands a snapshot of the holds to Options.SaveHolds, newest
// snapshot last even when several goroutines change the registry at once.
func (r *Registry) persist() {
	if r.opts.SaveHolds == nil {
		return
	}
	r.mu.Lock()
	now := time.Now()
	holds := make([]Hold, 0, len(r.names))
	for k, e := range r.names {
		h := Hold{Key: k, Owner: e.owner, Label: e.label}
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

// maxPeerPublic bounds the public keys of other instances this one follows.
const maxPeerPublic = 4096

// peerPublic is what this instance knows of the public exposures other
// instances serve, under Registry.mu.
type peerPublic struct {
	keys   map[string]bool            // "tcp/PORT", "udp/PORT", "sni/NAME" served elsewhere
	lns    map[string]*PublicListener // ports open here for them (not an agent's here)
	failed map[string]bool            // ports that could not be opened (logged once)
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
func listenPublic(host, netw string, port int, key string) (*PublicListener, error) {
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	pl := &PublicListener{Key: key}
	var err error
	if netw == "udp" {
		var ua *net.UDPAddr
		if ua, err = net.ResolveUDPAddr("udp", addr); err == nil {
			pl.PC, err = net.ListenUDP("udp", ua)
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
func (r *Registry) takePeerListenerLocked(k string) *PublicListener {
	ln := r.peerPub.lns[k]
	delete(r.peerPub.lns, k)
	return ln
}

// keepForPeerLocked takes over the listener of a local entry that is dropped
// while another instance serves its key, so the port stays open; it reports
// whether it did. Called with r.mu held.
func (r *Registry) keepForPeerLocked(k string, ln *PublicListener) bool {
	if !r.peerPub.keys[k] || r.peerPub.lns == nil || r.peerPub.lns[k] != nil {
		return false
	}
	r.peerPub.lns[k] = ln
	return true
}

// peerServesSNI reports whether another instance serves the pass-through name key.
func (r *Registry) peerServesSNI(k string) bool {
	return r.peerPub.keys[k]
}

// SetPeerPublic records which public exposures other instances serve now
// (keys as Hold.Key: "tcp/PORT", "udp/PORT", "sni/NAME"). It opens the public
// ports among them that are not open here yet (and that Options.PublicPorts
// allows here) and closes those it had opened for keys no longer listed.
func (r *Registry) SetPeerPublic(keys []string) {
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
		pp.lns, pp.failed = map[string]*PublicListener{}, map[string]bool{}
	}
	pp.keys = want
	for k, ln := range pp.lns {
		if !want[k] {
			delete(pp.lns, k)
			r.hooks.Untrack(ln)
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
				r.warn("peering: another instance serves a public port this instance may not open (public-ports differ between instances); connections for it that reach this instance are refused",
					"exposure", DescribeKey(k))
			}
			continue
		}
		pl, err := listenPublic(r.opts.PublicHost, netw, port, k)
		if err != nil {
			if !pp.failed[k] {
				pp.failed[k] = true
				r.warn("peering: cannot open a public port another instance serves; connections for it that reach this instance are refused", "exposure", DescribeKey(k), "err", err)
			}
			continue
		}
		delete(pp.failed, k)
		if !r.hooks.Track(pl) {
			_ = pl.Close()
			return
		}
		pp.lns[k] = pl
		go r.hooks.Serve(pl)
	}
}

// warn logs a warning when the registry has a log.
func (r *Registry) warn(msg string, args ...any) {
	if r.hooks.Log != nil {
		r.hooks.Log.Warn(msg, args...)
	}
}
