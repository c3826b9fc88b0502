package reverse

// The registry: which agent holds which reverse name (and public port or
// server name), the grace a crashed agent's names keep, and the sessions
// pending until an agent picks them up.

import (
	"context"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// CodeTooManyNames refuses a listen that would leave the identity holding
// more reverse names and public exposures than Options.MaxNamesPerIdentity.
const CodeTooManyNames = "too_many_names"

// Options configure a Registry: proxy.ReverseOptions, defaults applied, says
// what each is.
type Options struct {
	Zone                string
	Grace, RestartGrace time.Duration
	MaxPending          int
	MaxNamesPerIdentity int
	PickupTimeout       time.Duration
	Store               HoldStore
	Lease, Renew        time.Duration
	PublicPorts         func(network string, port int) bool
	PublicHost          string
	Holds               []Hold
	SaveHolds           func([]Hold)
}

// Hooks are what a Registry needs of the server that assembles it.
type Hooks struct {
	// Log takes the registry's log lines; nil drops them.
	Log *slog.Logger
	// Track records a public listener the registry opened among the server's
	// listeners; false (the server is shutting down) refuses it. Untrack
	// forgets such a listener and closes it.
	Track   func(net.Listener) bool
	Untrack func(net.Listener)
	// Serve serves a public listener until it closes; the registry runs it
	// on a goroutine of its own.
	Serve func(*PublicListener)
	// Leases counts what RunLeases did.
	Leases *LeaseCounters
}

type entry struct {
	owner string // device ID
	agent *Agent
	until time.Time // end of the grace period while agent is nil
	// Public exposures: the reverse label sessions go to, the public port's
	// listener (kept open through the grace period) and the timer that closes it.
	label string
	ln    *PublicListener
	timer *time.Timer
	// With a Store: the epoch of the agent's claim, and the end of this
	// instance's lease as last confirmed (zero: fenced or taken over).
	epoch      int64
	leaseUntil time.Time
}

// Registry is the reverse registry of one server.
type Registry struct {
	opts     Options
	hooks    Hooks
	mu       sync.Mutex
	names    map[string]*entry   // full name, "tcp/PORT" or "sni/NAME" → holder
	sessions map[string]*Pending // announced, not yet accepted (TLS)
	peerPub  peerPublic          // public exposures other instances serve (public.go)

	// With a Store (leases.go): RunLeases is kicked by other instances'
	// changes; renewErr is the last renewal's outcome, under mu.
	kick      chan struct{}
	renewErr  error
	storeFail atomic.Pointer[func() bool] // SetStoreFailHook

	seq    uint64 // holds snapshots taken (persist), under mu
	saveMu sync.Mutex
	saved  uint64 // newest snapshot saved, under saveMu
}

// New is the registry of opts, with the holds opts.Holds restored.
func New(opts Options, hooks Hooks) *Registry {
	r := &Registry{opts: opts, hooks: hooks, names: map[string]*entry{}, sessions: map[string]*Pending{}}
	if opts.Store != nil {
		r.kick = make(chan struct{}, 1)
	}
	r.loadHolds(opts.Holds)
	return r
}

// InZone reports whether host is the zone itself or any name under it. Such names
// are never resolved or dialed on the network, even when they are no valid
// reverse name (more than one label).
func (r *Registry) InZone(host string) bool {
	return host == r.opts.Zone || strings.HasSuffix(host, "."+r.opts.Zone)
}

// Name returns the label of host when host is "<label>.<zone>".
func (r *Registry) Name(host string) (string, bool) {
	label, ok := strings.CutSuffix(host, "."+r.opts.Zone)
	return label, ok && label != "" && !strings.Contains(label, ".")
}

// Claim gives a's names to a, or refuses if another identity holds one. A newer
// session of the same owner takes over; the replaced sessions are returned.
//
// With a Store the database decides first (leases.go): a key another
// identity holds there is refused whatever this instance remembers, and the
// claim's epochs are recorded on a.
func (r *Registry) Claim(a *Agent) ([]*Agent, *wire.HelloError) {
	if r.opts.Store != nil {
		r.mu.Lock()
		herr := r.precheckLocked(a, a.Keys(), time.Now())
		r.mu.Unlock()
		if herr != nil {
			return nil, herr
		}
		if herr := r.storeClaim(a, a.Keys()); herr != nil {
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
func (r *Registry) precheckLocked(a *Agent, keys []string, now time.Time) *wire.HelloError {
	for _, n := range keys {
		if e := r.names[n]; e != nil && e.owner != a.ID.DeviceID && e.agent != nil {
			return wire.Errorf(wire.CodeNameTaken, "%s is registered by another identity; choose another", DescribeKey(n))
		}
	}
	return r.checkNamesLocked(a, keys, now)
}

func (r *Registry) claimLocked(a *Agent) ([]*Agent, *wire.HelloError) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	keys := a.Keys()
	for _, n := range keys {
		e := r.names[n]
		if e == nil || e.owner == a.ID.DeviceID {
			continue
		}
		if e.agent != nil {
			return nil, wire.Errorf(wire.CodeNameTaken, "%s is registered by another identity; choose another", DescribeKey(n))
		}
		if now.Before(e.until) && r.opts.Store == nil { // with a store, the database judged the grace
			return nil, wire.Errorf(wire.CodeNameTaken, "%s belongs to another identity, whose agent is reconnecting; choose another", DescribeKey(n))
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
	for _, p := range a.Public {
		labels[p.Key()] = p.Name
	}
	var replaced []*Agent
	for _, n := range keys {
		e := r.names[n]
		if e == nil {
			e = &entry{owner: a.ID.DeviceID}
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
		e.owner = a.ID.DeviceID
		e.epoch, e.leaseUntil = a.epochs[n], a.leaseUntil
		if ln := opened[n]; ln != nil {
			e.ln = ln
			go r.hooks.Serve(ln)
		}
	}
	return replaced, nil
}

// Release marks a's names offline for grace (or frees them at once when grace
// is 0: the agent unregistered) and refuses its pending sessions. With a
// Store, a fenced agent's names are forgotten here at once (the database keeps
// them its owner's), and the database is told.
func (r *Registry) Release(a *Agent, grace time.Duration) {
	r.mu.Lock()
	until := time.Now().Add(grace)
	for _, n := range a.Keys() {
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

// Lookup finds the live agent for a full name.
func (r *Registry) Lookup(host string) (*Agent, *wire.HelloError) {
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

// LookupKey finds the live agent for a registry key and the label it routes to.
func (r *Registry) LookupKey(k string) (*Agent, string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.names[k]
	if e == nil || e.agent == nil || !r.currentLocked(k, e, time.Now()) {
		return nil, "", false
	}
	return e.agent, e.label, true
}

// current reports whether this instance may open a session to e's agent for
// key: without a store always; with one, while the agent's epoch is the one
// this instance last confirmed and its lease has not run out. r.mu is held.
func (r *Registry) currentLocked(key string, e *entry, now time.Time) bool {
	if r.opts.Store == nil {
		return true
	}
	return e.agent != nil && e.agent.epochs[key] == e.epoch && now.Before(e.leaseUntil)
}

// Owner returns the device that holds a full name, online or within its grace
// period; with a Store, a name this instance does not know is looked up there
// (its agent may be on another instance).
func (r *Registry) Owner(host string) (string, bool) {
	r.mu.Lock()
	e := r.names[host]
	if e != nil && (e.agent != nil || time.Now().Before(e.until)) {
		defer r.mu.Unlock()
		return e.owner, true
	}
	r.mu.Unlock()
	return r.StoreOwner(host)
}

// StoreOwner asks the store who holds key, for a key this instance does not
// know: its agent is on another instance. An error is "not held" (fail closed).
func (r *Registry) StoreOwner(key string) (string, bool) {
	if r.opts.Store == nil || r.storeBlocked() {
		return "", false
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.opts.Renew)
	defer cancel()
	owner, held, err := r.opts.Store.Owner(ctx, key)
	if err != nil {
		r.LogStoreErr("owner", err)
		return "", false
	}
	return owner, held
}

// pend records an announced session; past MaxPending the oldest is refused.
func (r *Registry) pend(a *Agent, p *Pending) {
	r.mu.Lock() // lock order: r.mu, then a.pmu
	a.pmu.Lock()
	a.pending = append(a.pending, p)
	var evict *Pending
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
func (r *Registry) unpend(p *Pending, st wire.Stream) bool {
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
func (r *Registry) pendingCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sessions)
}

// EndAgents ends every agent's control session with cause (Shutdown: the agents
// are told and reconnect, and their names stay held for them meanwhile).
func (r *Registry) EndAgents(cause error) {
	r.mu.Lock()
	agents := make(map[*Agent]struct{})
	for _, e := range r.names {
		if e.agent != nil {
			agents[e.agent] = struct{}{}
		}
	}
	r.mu.Unlock()
	for a := range agents {
		if a.End != nil {
			a.End(cause)
		}
	}
}

// checkNamesLocked refuses a claim of keys by a that would leave a's device
// holding more than MaxNamesPerIdentity names and public exposures. It counts
// what the device's other control sessions hold and what is reserved for it
// while an agent reconnects; keys it holds already (a reconnect, a takeover by
// its own newer session) count once. r.mu is held.
func (r *Registry) checkNamesLocked(a *Agent, keys []string, now time.Time) *wire.HelloError {
	max := r.opts.MaxNamesPerIdentity
	if len(keys) > max {
		return wire.Errorf(CodeTooManyNames, "this registration asks for %d reverse names and public exposures; the server allows %d per device (max-reverse-names-per-identity); expose fewer from one device", len(keys), max)
	}
	held := 0
	for n, e := range r.names {
		if e.owner != a.ID.DeviceID || e.agent == nil && !now.Before(e.until) || slices.Contains(keys, n) {
			continue
		}
		held++
	}
	if held+len(keys) > max {
		return wire.Errorf(CodeTooManyNames, "%s already holds %d reverse names and public exposures (through its other agents, or reserved for an agent that is reconnecting) and asks for %d more; the server allows %d per device (max-reverse-names-per-identity); stop the agents it no longer needs (a name whose agent went away without stopping stays reserved for %s) and try again", a.ID, held, len(keys), max, r.opts.Grace)
	}
	return nil
}

// LookupEpoch finds the agent that serves key here at the given epoch, while
// this instance's lease on it is current, and the label key routes to; nil
// when none does (a peer's open for an agent that moved, or a lapsed lease).
func (r *Registry) LookupEpoch(key string, epoch int64) (*Agent, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.names[key]
	if e != nil && e.agent != nil && e.epoch == epoch && r.currentLocked(key, e, time.Now()) {
		return e.agent, e.label
	}
	return nil, ""
}

// Pending is the session announced as id and not yet picked up, or nil.
func (r *Registry) Pending(id string) *Pending {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sessions[id]
}

// PeerPending is the session announced as id to an agent of device and not
// yet picked up, when this instance serves key for that device at epoch now
// (another instance received the pickup and offers it here), or nil.
func (r *Registry) PeerPending(id, device, key string, epoch int64) *Pending {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.sessions[id]
	e := r.names[key]
	// The offered name proves that this instance holds names of the
	// device now (its epoch is current); it may be another agent's of
	// the same device than the one the session was announced to (the
	// peer offers one name per instance).
	// A name held for its owner's return has no agent (nil) to compare.
	ok := p != nil && p.agent.ID.DeviceID == device && e != nil && e.agent != nil && e.agent.ID.DeviceID == p.agent.ID.DeviceID &&
		e.epoch == epoch && r.currentLocked(key, e, time.Now())
	if !ok {
		return nil
	}
	return p
}

// Each calls f, with the registry locked, for every key held: its owner, its
// agent (nil while it is held for the owner's return) and its public
// listener (nil for a name or a server name).
func (r *Registry) Each(f func(key, owner string, a *Agent, ln *PublicListener)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, e := range r.names {
		f(k, e.owner, e.agent, e.ln)
	}
}

// PassesThrough reports whether an agent here or on another instance holds
// the pass-through server name key ("sni/NAME").
func (r *Registry) PassesThrough(key string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.names[key]
	return ok || r.peerServesSNI(key)
}

// PublicAddr is the address of the public listener behind key.
func (r *Registry) PublicAddr(key string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.names[key]; e != nil && e.ln != nil {
		return e.ln.Addr().String()
	}
	return ""
}

// DescribeKey names a registry key (a full reverse name, "tcp/PORT",
// "udp/PORT" or "sni/NAME") for people.
func DescribeKey(k string) string {
	switch {
	case strings.HasPrefix(k, "tcp/"):
		return "public TCP port " + k[len("tcp/"):]
	case strings.HasPrefix(k, "udp/"):
		return "public UDP port " + k[len("udp/"):]
	case strings.HasPrefix(k, "sni/"):
		return "public server name " + k[len("sni/"):]
	}
	return k
}
