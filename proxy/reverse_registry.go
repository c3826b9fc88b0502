package proxy

// The reverse registry: which agent holds which reverse name (and public port or
// server name), the grace a crashed agent's names keep, and the sessions pending
// until an agent picks them up. The protocol operations that use it are in
// reverse.go.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"
)

// reverseAgent is one live control session of an agent.
type reverseAgent struct {
	id        authz.Identity
	transport string
	names     []string        // full names
	udp       map[string]bool // full names whose service is UDP
	public    []publicClaim
	ctx       context.Context // the control session's: ends its public sessions too
	ctl       wire.Stream
	end       context.CancelCauseFunc
	// open starts a session: a stream opened to the agent (QUIC) or an
	// announcement the agent answers with an accept connection (TLS). openFlow
	// starts a public UDP session: a UDPFlow on such a stream (reverse_udp.go).
	open     func(ctx context.Context, hdr wire.SessionHeader) (wire.Stream, *wire.HelloError)
	openFlow func(ctx context.Context, hdr wire.SessionHeader, queueLen int) (*wire.UDPFlow, *wire.HelloError)

	// epochs are the keys' epochs the store gave this agent's claim, and
	// leaseUntil the end of the lease it got (ReverseOptions.Store).
	epochs     map[string]int64
	leaseUntil time.Time

	wmu     sync.Mutex // serialises frames on ctl
	pmu     sync.Mutex
	pending []*pendingSession // oldest first (TLS)

	// devicesOnly: a reverse HTTP name's holder whose exposer lets only
	// enrolled devices reach it (the claim records it: reverse.AccessHoldStore).
	devicesOnly bool
}

type pendingSession struct {
	id    string
	agent *reverseAgent
	ch    chan wire.Stream // receives the accept connection, or nil when refused
}

type revEntry struct {
	owner string // device ID
	agent *reverseAgent
	until time.Time // end of the grace period while agent is nil
	// Public exposures: the reverse label sessions go to, the public port's
	// listener (kept open through the grace period) and the timer that closes it.
	label string
	ln    *publicListener
	timer *time.Timer
	// With a Store: the epoch of the agent's claim, and the end of this
	// instance's lease as last confirmed (zero: fenced or taken over).
	epoch      int64
	leaseUntil time.Time
}

type reverseRegistry struct {
	opts     ReverseOptions
	mu       sync.Mutex
	names    map[string]*revEntry       // full name, "tcp/PORT" or "sni/NAME" → holder
	sessions map[string]*pendingSession // announced, not yet accepted (TLS)
	srv      *Server                    // opens and serves public ports
	tunnels  tunnelState                // holders of names served by reverse tunnels (revtunnel_pool.go)
	peerPub  peerPublic                 // public exposures other instances serve (peer_public.go)
	// pendingPerID counts the dials waiting for an agent per dialing device (limits.go).
	pendingPerID identityCount

	// With a Store (holdstore.go): RunLeases is kicked by other instances'
	// changes; renewErr is the last renewal's outcome, under mu.
	kick      chan struct{}
	renewErr  error
	storeFail atomic.Pointer[func() bool] // SetHoldStoreFailHook

	seq    uint64 // holds snapshots taken (persist), under mu
	saveMu sync.Mutex
	saved  uint64 // newest snapshot saved, under saveMu
}

func newReverseRegistry(opts ReverseOptions) *reverseRegistry {
	opts = opts.withDefaults()
	opts.HTTPTunnels = opts.HTTPTunnels.withDefaults()
	r := &reverseRegistry{opts: opts, names: map[string]*revEntry{}, sessions: map[string]*pendingSession{}}
	if opts.Store != nil {
		r.kick = make(chan struct{}, 1)
	}
	r.loadHolds(opts.Holds)
	return r
}

// name returns the label of host when host is "<label>.<zone>".
// inZone reports whether host is the zone itself or any name under it. Such names
// are never resolved or dialed on the network, even when they are no valid
// reverse name (more than one label).
func (r *reverseRegistry) inZone(host string) bool {
	return host == r.opts.Zone || strings.HasSuffix(host, "."+r.opts.Zone)
}

func (r *reverseRegistry) name(host string) (string, bool) {
	label, ok := strings.CutSuffix(host, "."+r.opts.Zone)
	return label, ok && label != "" && !strings.Contains(label, ".")
}

// claim gives a's names to a, or refuses if another identity holds one. A newer
// session of the same owner takes over; the replaced sessions are returned.
//
// With a Store the database decides first (holdstore.go): a key another
// identity holds there is refused whatever this instance remembers, and the
// claim's epochs are recorded on a.
func (r *reverseRegistry) claim(a *reverseAgent) ([]*reverseAgent, *wire.HelloError) {
	if r.opts.Store != nil {
		r.mu.Lock()
		herr := r.precheckLocked(a, a.keys(), time.Now())
		r.mu.Unlock()
		if herr != nil {
			return nil, herr
		}
		if herr := r.storeClaim(a, a.keys()); herr != nil {
			return nil, herr
		}
	}
	replaced, herr := r.claimLocked(a)
	if herr != nil {
		r.storeRelease(a, r.opts.Grace) // what the owner held stays reserved for it
		return nil, herr
	}
	r.persist()
	return replaced, nil
}

// precheckLocked refuses, before the store is asked, what this instance
// refuses anyway: a key whose agent of another identity is live here, and
// more keys than the device may hold. r.mu is held.
func (r *reverseRegistry) precheckLocked(a *reverseAgent, keys []string, now time.Time) *wire.HelloError {
	for _, n := range keys {
		if e := r.names[n]; e != nil && e.owner != a.id.DeviceID && e.agent != nil {
			return wire.Errorf(wire.CodeNameTaken, "%s is registered by another identity; choose another", reverse.DescribeKey(n))
		}
	}
	return r.checkNamesLocked(a, keys, now)
}

func (r *reverseRegistry) claimLocked(a *reverseAgent) ([]*reverseAgent, *wire.HelloError) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	keys := a.keys()
	for _, n := range keys {
		e := r.names[n]
		if e == nil || e.owner == a.id.DeviceID {
			continue
		}
		if e.agent != nil {
			return nil, wire.Errorf(wire.CodeNameTaken, "%s is registered by another identity; choose another", reverse.DescribeKey(n))
		}
		if now.Before(e.until) && r.opts.Store == nil { // with a store, the database judged the grace
			return nil, wire.Errorf(wire.CodeNameTaken, "%s belongs to another identity, whose agent is reconnecting; choose another", reverse.DescribeKey(n))
		}
		r.dropLocked(n, e) // another owner's hold that has run out
	}
	if herr := r.checkNamesLocked(a, keys, now); herr != nil {
		return nil, herr
	}
	opened, herr := r.openPublic(a)
	if herr != nil {
		return nil, herr
	}
	labels := map[string]string{}
	for _, p := range a.public {
		labels[p.Key()] = p.Name
	}
	var replaced []*reverseAgent
	for _, n := range keys {
		e := r.names[n]
		if e == nil {
			e = &revEntry{owner: a.id.DeviceID}
			r.names[n] = e
		}
		if e.agent != nil && e.agent != a && !slices.Contains(replaced, e.agent) {
			replaced = append(replaced, e.agent)
		}
		if e.timer != nil {
			e.timer.Stop()
			e.timer = nil
		}
		e.agent, e.until, e.label = a, time.Time{}, labels[n]
		e.owner = a.id.DeviceID
		e.epoch, e.leaseUntil = a.epochs[n], a.leaseUntil
		if ln := opened[n]; ln != nil {
			e.ln = ln
			go r.srv.acceptPublic(ln)
		}
	}
	return replaced, nil
}

// release marks a's names offline for grace (or frees them at once when grace
// is 0: the agent unregistered) and refuses its pending sessions. With a
// Store, a fenced agent's names are forgotten here at once (the database keeps
// them its owner's), and the database is told.
func (r *reverseRegistry) release(a *reverseAgent, grace time.Duration) {
	r.mu.Lock()
	until := time.Now().Add(grace)
	for _, n := range a.keys() {
		if e := r.names[n]; e != nil && e.agent == a {
			if grace <= 0 || r.opts.Store != nil && e.leaseUntil.IsZero() {
				r.dropLocked(n, e)
				continue
			}
			e.agent, e.until = nil, until
			if e.ln != nil { // the port stays open for the owner's return, then closes
				e.timer = time.AfterFunc(grace, func() { r.expire(n, e) })
			}
		}
	}
	r.mu.Unlock()
	r.storeRelease(a, grace)
	r.persist()
	a.pmu.Lock()
	pending := a.pending
	a.pending = nil
	a.pmu.Unlock()
	for _, p := range pending {
		r.unpend(p, nil)
	}
}

// lookup finds the live agent for a full name.
func (r *reverseRegistry) lookup(host string) (*reverseAgent, *wire.HelloError) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.names[host]
	now := time.Now()
	switch {
	case e == nil || e.agent == nil && !now.Before(e.until):
		return nil, wire.Errorf(wire.CodeReverseUnknown, "no agent serves %s; is `tp expose` running for it?", host)
	case e.agent == nil:
		return nil, wire.Errorf(wire.CodeReverseOffline, "the agent serving %s is offline and reconnecting; try again in a few seconds", host)
	case !r.currentLocked(host, e, now):
		return nil, wire.Errorf(wire.CodeReverseOffline, "this TP server instance no longer holds a current lease on %s (the database is unreachable, or another instance took it over); try again in a few seconds", host)
	}
	return e.agent, nil
}

// owner returns the device that holds a full name, online or within its grace
// period; with a Store, a name this instance does not know is looked up there
// (its agent may be on another instance).
func (r *reverseRegistry) owner(host string) (string, bool) {
	r.mu.Lock()
	e := r.names[host]
	if e != nil && (e.agent != nil || time.Now().Before(e.until)) {
		defer r.mu.Unlock()
		return e.owner, true
	}
	r.mu.Unlock()
	return r.storeOwner(host)
}

// pend records an announced session; past MaxPending the oldest is refused.
func (r *reverseRegistry) pend(a *reverseAgent, p *pendingSession) {
	r.mu.Lock() // lock order: r.mu, then a.pmu
	a.pmu.Lock()
	a.pending = append(a.pending, p)
	var evict *pendingSession
	if len(a.pending) > r.opts.MaxPending {
		evict = a.pending[0]
		a.pending = a.pending[1:]
		delete(r.sessions, evict.id)
	}
	a.pmu.Unlock()
	r.sessions[p.id] = p
	r.mu.Unlock()
	if evict != nil {
		evict.ch <- nil
	}
}

// unpend removes p; if it was still pending, st (nil: refused) is delivered to its
// dialer. It reports whether p was still pending.
func (r *reverseRegistry) unpend(p *pendingSession, st wire.Stream) bool {
	r.mu.Lock()
	_, ok := r.sessions[p.id]
	delete(r.sessions, p.id)
	r.mu.Unlock()
	if !ok {
		return false
	}
	p.agent.pmu.Lock()
	for i, q := range p.agent.pending {
		if q == p {
			p.agent.pending = append(p.agent.pending[:i], p.agent.pending[i+1:]...)
			break
		}
	}
	p.agent.pmu.Unlock()
	p.ch <- st
	return true
}

// pendingCount is the number of sessions announced and not picked up (tests).
func (r *reverseRegistry) pendingCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sessions)
}

func newSessionID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// endAgents ends every agent's control session with cause (Shutdown: the agents
// are told and reconnect, and their names stay held for them meanwhile).
func (r *reverseRegistry) endAgents(cause error) {
	r.mu.Lock()
	agents := make(map[*reverseAgent]struct{})
	for _, e := range r.names {
		if e.agent != nil {
			agents[e.agent] = struct{}{}
		}
	}
	r.mu.Unlock()
	for a := range agents {
		if a.end != nil {
			a.end(cause)
		}
	}
}
