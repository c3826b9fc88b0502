package pgstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/proxy"
)

// Instance is one running tpd as tp_instances records it.
type Instance struct {
	Name, PeerAddress, PolicyRevision string
	Started, Heartbeat                time.Time
	// Draining: it stopped taking new connections and waits for its live
	// sessions; its row goes when it has stopped.
	Draining bool
	// Age is how long ago its last heartbeat was, on the database's clock
	// (read by Instances only).
	Age time.Duration
}

// Heartbeat records instance (its peer address, policy revision and whether
// it drains) with the database's now(): peers find it there, and `tpd status`
// lists it.
func (db *DB) Heartbeat(ctx context.Context, inst Instance) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	_, err := db.pool.Exec(ctx, `INSERT INTO tp_instances (name, peer_address, policy_revision, draining) VALUES ($1, $2, $3, $4)
		ON CONFLICT (name) DO UPDATE SET peer_address = excluded.peer_address,
			policy_revision = excluded.policy_revision, draining = excluded.draining, heartbeat = now()`,
		inst.Name, inst.PeerAddress, inst.PolicyRevision, inst.Draining)
	if err != nil {
		return fmt.Errorf("recording this instance in the database: %w", err)
	}
	return nil
}

// ForgetInstance deletes instance's row (it stops), and the rows of
// instances silent for longer than stale.
func (db *DB) ForgetInstance(ctx context.Context, name string, stale time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	_, err := db.pool.Exec(ctx, `DELETE FROM tp_instances WHERE name = $1 OR heartbeat < now() - $2 * interval '1 microsecond'`,
		name, micros(stale))
	return err
}

// maxInstances bounds the rows Instances reads: far more instances than one
// database serves, so that a table filled by mistake cannot make `tpd status`
// unbounded.
const maxInstances = 1000

// Instances lists the instances whose heartbeat is newer than within (every
// row when within is 0), by name, each with the age of its heartbeat on the
// database's clock; at most maxInstances.
func (db *DB) Instances(ctx context.Context, within time.Duration) ([]Instance, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	rows, err := db.pool.Query(ctx, `SELECT name, peer_address, policy_revision, started, heartbeat, draining,
			(extract(epoch FROM now() - heartbeat) * 1000000)::bigint
		FROM tp_instances
		WHERE $1::float8 = 0 OR heartbeat > now() - $1::float8 * interval '1 microsecond' ORDER BY name LIMIT $2`, micros(within), maxInstances)
	if err != nil {
		return nil, fmt.Errorf("reading the instances from the database: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Instance, error) {
		var i Instance
		var age int64
		err := r.Scan(&i.Name, &i.PeerAddress, &i.PolicyRevision, &i.Started, &i.Heartbeat, &i.Draining, &age)
		i.Age = time.Duration(max(age, 0)) * time.Microsecond
		return i, err
	})
}

// maxRoutes bounds the route cache; past it the cache starts over.
const maxRoutes = 4096

// Routes answers which instance serves a key, for proxy.PeerOptions.Route:
// from the row in tp_holds whose lease is current (with the access its claim
// recorded: devices only or anyone), joined with the serving
// instance's peer address, unless that instance drains (it takes no new
// connections; its agents are moving). Answers are cached until a claim or release on any
// instance (NOTIFY holds: Invalidate), so a dial of a name served elsewhere
// costs no query while nothing moves.
type Routes struct {
	db    *DB
	mu    sync.Mutex
	cache map[string]cachedRoute
	gen   uint64 // bumped by Invalidate: an answer read before it is not cached
}

// cachedRoute is an answer: served by rt, or (ok false) by no other instance,
// which is cached too, so that requests for names nobody serves (a website
// handshake for any name in the reverse zone) cost no query until a claim.
type cachedRoute struct {
	rt proxy.PeerRoute
	ok bool
}

// NewRoutes is the route lookup on db; call Invalidate on TopicHolds.
func NewRoutes(db *DB) *Routes { return &Routes{db: db, cache: map[string]cachedRoute{}} }

// Invalidate forgets every cached route.
func (r *Routes) Invalidate() {
	r.mu.Lock()
	r.gen++
	clear(r.cache)
	r.mu.Unlock()
}

// Forget drops key's cached route (a forward found it wrong).
func (r *Routes) Forget(key string) {
	r.mu.Lock()
	delete(r.cache, key)
	r.mu.Unlock()
}

// Route implements proxy.PeerOptions.Route.
func (r *Routes) Route(ctx context.Context, key string) (proxy.PeerRoute, bool, error) {
	r.mu.Lock()
	c, hit := r.cache[key]
	gen := r.gen
	r.mu.Unlock()
	if hit {
		return c.rt, c.ok, nil
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var rt proxy.PeerRoute
	err := r.db.pool.QueryRow(ctx, `SELECT h.instance, i.peer_address, h.epoch, h.devices_only FROM tp_holds h
		JOIN tp_instances i ON i.name = h.instance
		WHERE h.key = $1 AND h.instance <> '' AND h.lease_until > now() AND NOT i.draining`, key).Scan(&rt.Instance, &rt.Addr, &rt.Epoch, &rt.DevicesOnly)
	ok := err == nil
	if errors.Is(err, pgx.ErrNoRows) {
		err = nil
	}
	if err != nil {
		return proxy.PeerRoute{}, false, fmt.Errorf("reading which instance serves %s: %w", key, err)
	}
	r.mu.Lock()
	if r.gen == gen {
		if len(r.cache) >= maxRoutes {
			clear(r.cache)
		}
		r.cache[key] = cachedRoute{rt: rt, ok: ok}
	}
	r.mu.Unlock()
	return rt, ok, nil
}
