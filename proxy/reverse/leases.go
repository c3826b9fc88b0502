package reverse

// Leases and fencing of reverse names, public ports and pass-through server
// names when several TP server instances share one database (Options.Store).
// The database decides who holds a key and which instance serves it; this
// instance renews its leases and stops serving a key on its own when it could
// not renew it within the lease (self-fencing), so that a partitioned instance
// never serves a key that another instance may hold by then. docs/SCALE.md
// describes the timings and what agents and dialers see.

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// CodeHoldsUnavailable refuses a registration this instance cannot record in
// the shared database (unreachable): the agent retries.
const CodeHoldsUnavailable = "holds_unavailable"

// LeaseCounters count what RunLeases did, for the server's statistics.
type LeaseCounters struct {
	Renewals, RenewalFailures atomic.Int64
	Fenced, TakenOver         atomic.Int64 // names
}

var (
	// ErrFenced ends the agents whose lease this instance could not renew.
	ErrFenced = errors.New("this TP server instance could not renew its lease on the names in the database in time and stopped serving them")
	// ErrTakenOver ends an agent whose names another instance claimed for the
	// same device (a newer agent of it connected there).
	ErrTakenOver = errors.New("a newer agent of the same device took over these names on another TP server instance")
)

// storeOp bounds one call to the store made on an agent's behalf.
func (r *Registry) storeCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), r.opts.Lease)
}

// storeClaim claims a's keys in the store and records the epochs on a.
func (r *Registry) storeClaim(a *Agent, keys []string) *wire.HelloError {
	ctx, cancel := r.storeCtx()
	defer cancel()
	sent := time.Now()
	var leases []HoldLease
	err := errStoreBlocked
	if !r.storeBlocked() {
		leases, err = r.claimStore(ctx, a, keys)
	}
	var he *HeldError
	var tm *TooManyHeldError
	switch {
	case errors.As(err, &he):
		return wire.Errorf(wire.CodeNameTaken, "%s", he.Error())
	case errors.As(err, &tm):
		return wire.Errorf(CodeTooManyNames, "%s", tm.Error())
	case err != nil:
		r.LogStoreErr("claim", err)
		return wire.Errorf(CodeHoldsUnavailable, "this TP server cannot record the names in its database just now (%v); the agent retries", err)
	}
	a.epochs = make(map[string]int64, len(leases))
	for _, l := range leases {
		a.epochs[l.Key] = l.Epoch
	}
	a.leaseUntil = sent.Add(r.opts.Lease)
	return nil
}

// holdFor is how long a renewed row stays its owner's after its last renewal:
// the lease, then the reservation a restart gets (a crashed instance renews no
// more; its agents need that long to come back, on any instance).
func (r *Registry) holdFor() time.Duration { return r.opts.Lease + r.opts.RestartGrace }

func (a *Agent) leases() []HoldLease {
	ls := make([]HoldLease, 0, len(a.epochs))
	for k, e := range a.epochs {
		ls = append(ls, HoldLease{Key: k, Epoch: e})
	}
	return ls
}

// storeRelease ends this instance's service of a's keys in the store.
func (r *Registry) storeRelease(a *Agent, grace time.Duration) {
	if r.opts.Store == nil || len(a.epochs) == 0 {
		return
	}
	if r.storeBlocked() {
		r.LogStoreErr("release", errStoreBlocked)
		return
	}
	ctx, cancel := r.storeCtx()
	defer cancel()
	if err := r.opts.Store.Release(ctx, a.leases(), grace); err != nil {
		// The rows keep the hold of their last renewal: nothing is lost.
		r.LogStoreErr("release", err)
	}
}

// LogStoreErr logs a call to the store that failed.
func (r *Registry) LogStoreErr(op string, err error) {
	if r.hooks.Log != nil {
		r.hooks.Log.Warn("reverse holds: the database did not answer", "op", op, "err", err)
	}
}

// RunLeases renews this instance's leases every Options.Renew, at once after
// Kick, and fences the keys whose lease runs out, until ctx ends. It does
// nothing without a Store.
func (r *Registry) RunLeases(ctx context.Context) {
	if r.opts.Store == nil {
		return
	}
	go r.fenceLoop(ctx)
	t := time.NewTicker(r.opts.Renew)
	defer t.Stop()
	prune := time.NewTicker(time.Minute)
	defer prune.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-r.kick:
		case <-prune.C:
			pctx, cancel := r.storeCtx()
			if err := r.opts.Store.Prune(pctx); err != nil {
				r.LogStoreErr("prune", err)
			}
			cancel()
			continue
		}
		r.renew(ctx)
	}
}

// Kick asks RunLeases to renew now: another instance claimed or released a
// key, so a key of this instance may have moved.
func (r *Registry) Kick() {
	if r.kick == nil {
		return
	}
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// renew extends every live key's lease; keys the store no longer gives this
// instance at their epoch end their agents.
func (r *Registry) renew(ctx context.Context) {
	r.mu.Lock()
	var leases []HoldLease
	for k, e := range r.names {
		if e.agent != nil && e.epoch != 0 {
			leases = append(leases, HoldLease{Key: k, Epoch: e.epoch})
		}
	}
	r.mu.Unlock()
	if len(leases) == 0 {
		return
	}
	if r.storeBlocked() {
		r.noteRenew(errStoreBlocked)
		r.hooks.Leases.RenewalFailures.Add(1)
		return
	}
	rctx, cancel := context.WithTimeout(ctx, r.opts.Renew)
	sent := time.Now()
	kept, err := r.opts.Store.Renew(rctx, leases, r.opts.Lease, r.holdFor())
	cancel()
	r.noteRenew(err)
	if err != nil {
		r.hooks.Leases.RenewalFailures.Add(1)
		return
	}
	r.hooks.Leases.Renewals.Add(1)
	ok := make(map[string]bool, len(kept))
	for _, k := range kept {
		ok[k] = true
	}
	lost := map[*Agent]struct{}{}
	r.mu.Lock()
	for _, l := range leases {
		e := r.names[l.Key]
		if e == nil || e.epoch != l.Epoch || e.agent == nil {
			continue
		}
		if ok[l.Key] {
			e.leaseUntil = sent.Add(r.opts.Lease)
			continue
		}
		e.leaseUntil = time.Time{} // stale: no session from now on
		lost[e.agent] = struct{}{}
	}
	r.mu.Unlock()
	for a := range lost {
		r.hooks.Leases.TakenOver.Add(int64(len(a.Keys())))
		r.hooks.Log.Warn("reverse names taken over on another instance; ending the agent here", "identity", a.ID.String(), "names", a.Keys())
		a.End(ErrTakenOver)
	}
}

// noteRenew logs a change between renewing and failing to renew, once each way.
func (r *Registry) noteRenew(err error) {
	r.mu.Lock()
	was := r.renewErr
	r.renewErr = err
	r.mu.Unlock()
	switch {
	case err != nil && was == nil:
		r.hooks.Log.Error("reverse holds: cannot renew the leases in the database; the names stop being served here when their lease runs out", "err", err, "lease", r.opts.Lease)
	case err == nil && was != nil:
		r.hooks.Log.Info("reverse holds: renewing the leases in the database again")
	}
}

// fenceLoop ends the agents whose lease runs out before the next check, so
// that none is served past its lease.
func (r *Registry) fenceLoop(ctx context.Context) {
	step := r.opts.Lease / 10
	t := time.NewTicker(step)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		limit := time.Now().Add(2 * step) // the next check may come late on a loaded machine
		fenced := map[*Agent]struct{}{}
		r.mu.Lock()
		for _, e := range r.names {
			if e.agent != nil && e.epoch != 0 && !limit.Before(e.leaseUntil) {
				e.leaseUntil = time.Time{}
				fenced[e.agent] = struct{}{}
			}
		}
		r.mu.Unlock()
		for a := range fenced {
			r.hooks.Leases.Fenced.Add(int64(len(a.Keys())))
			r.hooks.Log.Error("reverse names fenced: their lease ran out before this instance could renew it; ending the agent so that no other instance and this one serve them at once",
				"identity", a.ID.String(), "names", a.Keys(), "lease", r.opts.Lease)
			a.End(ErrFenced)
		}
	}
}

// SetStoreFailHook makes every call to the hold store fail while fail
// returns true, as if this instance could not reach the database (tests of
// self-fencing of one instance while the others reach it).
func (r *Registry) SetStoreFailHook(fail func() bool) {
	r.storeFail.Store(&fail)
}

var errStoreBlocked = errors.New("the hold store is unreachable (test hook)")

func (r *Registry) storeBlocked() bool {
	f := r.storeFail.Load()
	return f != nil && (*f)()
}

// GraceAfter is how long an agent's names stay its owner's after its control
// session ended with cause: none when it unregistered, RestartGrace when the
// server shuts down (with a Store, another instance or this one's successor
// takes them back), else Grace.
func (r *Registry) GraceAfter(cause error) time.Duration {
	switch {
	case errors.Is(cause, ErrUnregistered):
		return 0
	case r.opts.Store != nil && errors.Is(cause, wire.ErrShutdown):
		return r.opts.RestartGrace
	}
	return r.opts.Grace
}

// claimStore claims keys for a in the store, with a's access when the store
// records it.
func (r *Registry) claimStore(ctx context.Context, a *Agent, keys []string) ([]HoldLease, error) {
	if as, ok := r.opts.Store.(AccessHoldStore); ok {
		return as.ClaimAccess(ctx, a.ID.DeviceID, keys, a.DevicesOnly, r.opts.Lease, r.holdFor())
	}
	return r.opts.Store.Claim(ctx, a.ID.DeviceID, keys, r.opts.Lease, r.holdFor())
}
