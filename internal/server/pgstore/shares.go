package pgstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/internal/server/users"
)

// shareColumns are a tp_shares row as scanShare reads it.
const shareColumns = "id, name, guest, user_name, approved_by, created, until, revoked, revoked_at"

// scanShare reads one row of shareColumns.
func scanShare(row pgx.Row) (users.Share, error) {
	var sh users.Share
	var revokedAt *time.Time
	if err := row.Scan(&sh.ID, &sh.Name, &sh.Guest, &sh.User, &sh.By, &sh.Created, &sh.Until, &sh.Revoked, &revokedAt); err != nil {
		return users.Share{}, err
	}
	sh.Created, sh.Until = sh.Created.UTC(), sh.Until.UTC()
	if revokedAt != nil {
		sh.RevokedAt = revokedAt.UTC()
	}
	return sh, nil
}

// AddShare implements users.Store in one transaction: the sharing user's row
// is locked first, so that one user's shares on every instance are counted
// one at a time; then the table, so that the store's bound counts every
// instance's too. Shares that ended more than users.ShareKeep ago are
// forgotten first.
func (u *Users) AddShare(sh users.Share, max int) error {
	if err := users.CheckShare(sh); err != nil {
		return err
	}
	if max <= 0 {
		max = users.DefaultMaxShares
	}
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		var one int
		if err := tx.QueryRow(ctx, "SELECT 1 FROM tp_users WHERE name = $1 FOR NO KEY UPDATE", sh.User).Scan(&one); errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("user %s: %w", sh.User, users.ErrNotFound)
		} else if err != nil {
			return err
		}
		// The lock comes before the delete, whose own weaker lock two
		// additions would each hold while asking for this one (as Enroll's).
		// It lets guests' sign-ins lock their share's row meanwhile.
		if _, err := tx.Exec(ctx, "LOCK TABLE tp_shares IN SHARE ROW EXCLUSIVE MODE"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "DELETE FROM tp_shares WHERE least(until, revoked_at) < now() - $1 * interval '1 microsecond'",
			users.ShareKeep.Microseconds()); err != nil {
			return err
		}
		var mine, kept, all int
		if err := tx.QueryRow(ctx, `SELECT count(*) FILTER (WHERE user_name = $1 AND NOT revoked AND until > now()),
			count(*) FILTER (WHERE user_name = $1), count(*) FROM tp_shares`, sh.User).
			Scan(&mine, &kept, &all); err != nil {
			return err
		}
		if mine >= max {
			return fmt.Errorf("user %s has %d shares that have not ended: %w", sh.User, mine, users.ErrTooManyShares)
		}
		if kept >= users.MaxSharesKept {
			return fmt.Errorf("user %s has %d shares kept, ended ones included: %w", sh.User, kept, users.ErrSharesKept)
		}
		// An ID is never used twice, even after its share is forgotten: a
		// guest's device of the old share would come back with it.
		var used bool
		if err := tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM tp_devices WHERE granted_by = $1)", users.ShareApprover+sh.ID).Scan(&used); err != nil {
			return err
		} else if used {
			return fmt.Errorf("share %s: %w", sh.ID, users.ErrShareIDUsed)
		}
		if all >= users.MaxSharesStored {
			return fmt.Errorf("the database holds %d shares: %w", all, users.ErrStoreFull)
		}
		tag, err := tx.Exec(ctx, `INSERT INTO tp_shares (id, name, guest, user_name, approved_by, created, until) VALUES ($1, $2, $3, $4, $5, $6, $7)
			ON CONFLICT (id) DO NOTHING`, sh.ID, sh.Name, sh.Guest, sh.User, sh.By, sh.Created, sh.Until)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("share %s: %w", sh.ID, users.ErrShareIDUsed)
		}
		return notify(ctx, tx, TopicUsers)
	})
	if errors.Is(err, users.ErrNotFound) || errors.Is(err, users.ErrTooManyShares) || errors.Is(err, users.ErrSharesKept) || errors.Is(err, users.ErrShareIDUsed) || errors.Is(err, users.ErrStoreFull) {
		return err
	}
	if err != nil {
		return unreachable("share "+sh.Name+" with "+sh.Guest, err)
	}
	u.afterWrite()
	return nil
}

// Shares implements users.Store, from the snapshot.
func (u *Users) Shares() []users.Share {
	s := u.snap.Load()
	out := make([]users.Share, 0, len(s.shares))
	for _, sh := range s.shares {
		out = append(out, *sh)
	}
	users.SortShares(out)
	return out
}

// RevokeShare implements users.Store: the statement that revokes is the
// check, so the time of the revocation is the first one's, whichever
// instance is asked.
func (u *Users) RevokeShare(id string) (users.Share, error) {
	var sh users.Share
	changed := false
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		var err error
		sh, err = scanShare(tx.QueryRow(ctx, `UPDATE tp_shares SET revoked = true, revoked_at = now() WHERE id = $1 AND NOT revoked
			RETURNING `+shareColumns, id))
		if err == nil {
			changed = true
			return notify(ctx, tx, TopicUsers)
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		// Revoked already, or none.
		sh, err = scanShare(tx.QueryRow(ctx, "SELECT "+shareColumns+" FROM tp_shares WHERE id = $1", id))
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("share %s: %w", id, users.ErrNotFound)
		}
		return err
	})
	if errors.Is(err, users.ErrNotFound) {
		return users.Share{}, err
	}
	if err != nil {
		return users.Share{}, unreachable("revoke share "+id, err)
	}
	if changed {
		u.afterWrite()
	}
	return sh, nil
}

// Share implements users.Store, from the snapshot.
func (u *Users) Share(id string) (users.Share, error) {
	if sh := u.snap.Load().shares[id]; sh != nil {
		return *sh, nil
	}
	return users.Share{}, fmt.Errorf("share %s: %w", id, users.ErrNotFound)
}

// SharedBy implements authz.Sharer, from the snapshot.
func (u *Users) SharedBy(deviceID string) string {
	s := u.snap.Load()
	if d := s.devices[deviceID]; d != nil {
		return users.Approvers{Shares: s.shares}.SharedBy(d)
	}
	return ""
}
