package pgstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/proxy/reverse"
)

// TopicHolds is notified when a reverse name or public exposure is claimed or
// released on any instance.
const TopicHolds = "holds"

// Holds keeps who holds which reverse name, public port and server name, and
// which instance serves it, in tp_holds; it implements reverse.HoldStore. Every
// time is the database's: instances' clocks never decide anything.
type Holds struct {
	db       *DB
	instance string
	// MaxPerOwner, when positive, bounds the keys one owner holds over every
	// instance (max-reverse-names-per-identity): a claim that would leave the
	// owner with more rows whose hold has not ended is refused with a
	// *reverse.TooManyHeldError. Claims of one owner are serialised (a
	// transaction-scoped advisory lock on the owner), so two instances
	// claiming at once cannot both pass the count.
	MaxPerOwner int
}

var _ reverse.HoldStore = (*Holds)(nil)

// NewHolds is the hold store of the instance named instance (unique per
// running process: a restarted tpd is another instance).
func NewHolds(db *DB, instance string) *Holds { return &Holds{db: db, instance: instance} }

// Instance is the name this store claims under.
func (h *Holds) Instance() string { return h.instance }

func micros(d time.Duration) int64 { return d.Microseconds() }

// Claim implements reverse.HoldStore: one INSERT … ON CONFLICT DO UPDATE takes
// every key whose row is the same owner's or has expired, and raises its
// epoch; if any key was not taken, nothing is (the transaction rolls back) and
// the holder of the first such key is returned in a *reverse.HeldError.
func (h *Holds) Claim(ctx context.Context, owner string, keys []string, lease, hold time.Duration) ([]reverse.HoldLease, error) {
	return h.ClaimAccess(ctx, owner, keys, false, lease, hold)
}

// ClaimAccess implements reverse.AccessHoldStore: Claim, recording on every
// key's row whether it is open to enrolled devices only (a reverse HTTP name
// exposed with --devices-only); Route reads it back for the other instances.
func (h *Holds) ClaimAccess(ctx context.Context, owner string, keys []string, devicesOnly bool, lease, hold time.Duration) ([]reverse.HoldLease, error) {
	keys = slices.Clone(keys)
	slices.Sort(keys) // one lock order for every claim: no deadlock between two
	keys = slices.Compact(keys)
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var leases []reverse.HoldLease
	err := pgx.BeginFunc(ctx, h.db.pool, func(tx pgx.Tx) error {
		if h.MaxPerOwner > 0 {
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtextextended('tp_holds/' || $1, 0))", owner); err != nil {
				return err
			}
		}
		rows, err := tx.Query(ctx, `INSERT INTO tp_holds AS h (key, owner, instance, epoch, lease_until, expires_at, devices_only)
			SELECT k, $2, $3, 1, now() + $4 * interval '1 microsecond', now() + $5 * interval '1 microsecond', $6
			FROM unnest($1::text[]) AS k
			ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, instance = excluded.instance,
				epoch = h.epoch + 1, lease_until = excluded.lease_until, expires_at = excluded.expires_at,
				devices_only = excluded.devices_only
			WHERE h.owner = excluded.owner OR h.expires_at < now()
			RETURNING h.key, h.epoch`, keys, owner, h.instance, micros(lease), micros(hold), devicesOnly)
		if err != nil {
			return err
		}
		leases, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (reverse.HoldLease, error) {
			var l reverse.HoldLease
			err := r.Scan(&l.Key, &l.Epoch)
			return l, err
		})
		if err != nil {
			return err
		}
		if len(leases) == len(keys) {
			if err := h.checkCount(ctx, tx, owner, len(keys)); err != nil {
				return err
			}
			return notify(ctx, tx, TopicHolds)
		}
		var he reverse.HeldError
		err = tx.QueryRow(ctx, `SELECT key, owner, instance <> '' AND lease_until > now() FROM tp_holds
			WHERE key = ANY($1) AND NOT key = ANY($2) ORDER BY key LIMIT 1`,
			keys, leaseKeys(leases)).Scan(&he.Key, &he.Owner, &he.Serving)
		if err != nil {
			return fmt.Errorf("reading the holder of a refused claim: %w", err)
		}
		return &he
	})
	if err != nil {
		if he := (*reverse.HeldError)(nil); errors.As(err, &he) {
			return nil, he
		}
		if tm := (*reverse.TooManyHeldError)(nil); errors.As(err, &tm) {
			return nil, tm
		}
		return nil, fmt.Errorf("claiming reverse names in the database: %w", err)
	}
	return leases, nil
}

// checkCount refuses (rolling the claim back) when owner, having just taken
// asked keys, holds more than MaxPerOwner rows whose hold has not ended.
func (h *Holds) checkCount(ctx context.Context, tx pgx.Tx, owner string, asked int) error {
	if h.MaxPerOwner <= 0 {
		return nil
	}
	var n int
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM tp_holds WHERE owner = $1 AND expires_at > now()", owner).Scan(&n); err != nil {
		return fmt.Errorf("counting the keys of %s: %w", owner, err)
	}
	if n > h.MaxPerOwner {
		return &reverse.TooManyHeldError{Owner: owner, Held: n - asked, Asked: asked, Max: h.MaxPerOwner}
	}
	return nil
}

func leaseKeys(ls []reverse.HoldLease) []string {
	keys := make([]string, len(ls))
	for i, l := range ls {
		keys[i] = l.Key
	}
	return keys
}

func leaseEpochs(ls []reverse.HoldLease) []int64 {
	e := make([]int64, len(ls))
	for i, l := range ls {
		e[i] = l.Epoch
	}
	return e
}

// Renew implements reverse.HoldStore: one UPDATE extends the rows this instance
// still holds at the epochs it claimed them; the keys it returns are those.
func (h *Holds) Renew(ctx context.Context, leases []reverse.HoldLease, lease, hold time.Duration) ([]string, error) {
	if len(leases) == 0 {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	rows, err := h.db.pool.Query(ctx, `UPDATE tp_holds AS h SET lease_until = now() + $4 * interval '1 microsecond',
			expires_at = now() + $5 * interval '1 microsecond'
		FROM unnest($1::text[], $2::bigint[]) AS k (key, epoch)
		WHERE h.key = k.key AND h.epoch = k.epoch AND h.instance = $3
		RETURNING h.key`, leaseKeys(leases), leaseEpochs(leases), h.instance, micros(lease), micros(hold))
	if err != nil {
		return nil, fmt.Errorf("renewing the leases on reverse names in the database: %w", err)
	}
	kept, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("renewing the leases on reverse names in the database: %w", err)
	}
	return kept, nil
}

// Release implements reverse.HoldStore: rows still this instance's at the given
// epochs stay the owner's for grace and are served by no instance; with grace
// 0 they are deleted.
func (h *Holds) Release(ctx context.Context, leases []reverse.HoldLease, grace time.Duration) error {
	if len(leases) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	q := `UPDATE tp_holds AS h SET instance = '', lease_until = now(), expires_at = now() + $4 * interval '1 microsecond'
		FROM unnest($1::text[], $2::bigint[]) AS k (key, epoch)
		WHERE h.key = k.key AND h.epoch = k.epoch AND h.instance = $3`
	args := []any{leaseKeys(leases), leaseEpochs(leases), h.instance, micros(grace)}
	if grace <= 0 {
		q = `DELETE FROM tp_holds AS h USING unnest($1::text[], $2::bigint[]) AS k (key, epoch)
			WHERE h.key = k.key AND h.epoch = k.epoch AND h.instance = $3`
		args = args[:3]
	}
	err := pgx.BeginFunc(ctx, h.db.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, q, args...); err != nil {
			return err
		}
		return notify(ctx, tx, TopicHolds)
	})
	if err != nil {
		return fmt.Errorf("releasing reverse names in the database: %w", err)
	}
	return nil
}

// Prune implements reverse.HoldStore: rows whose hold ended are deleted (a
// claim would take them anyway; this bounds the table).
func (h *Holds) Prune(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	_, err := h.db.pool.Exec(ctx, "DELETE FROM tp_holds WHERE expires_at < now()")
	return err
}

// Owner implements reverse.HoldStore.
func (h *Holds) Owner(ctx context.Context, key string) (string, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var owner string
	err := h.db.pool.QueryRow(ctx, "SELECT owner FROM tp_holds WHERE key = $1 AND expires_at > now()", key).Scan(&owner)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("reading the holder of %s in the database: %w", key, err)
	}
	return owner, true, nil
}
