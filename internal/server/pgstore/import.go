package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/internal/server/users"
)

// ErrNotEmpty means an import's target already holds another deployment's data.
var ErrNotEmpty = errors.New("the database already holds users, tokens or a deny list that did not come from this data dir")

// ErrMigratedBefore means the data dir was imported before: since then the
// database is the instances' state, and importing again would roll back what
// changed there.
var ErrMigratedBefore = errors.New("this data dir was migrated into the database before")

// ErrInstancesLive means tpd instances are running on the database.
var ErrInstancesLive = errors.New("tpd instances are running on this database")

// Import is a single-process data dir's state, for `tpd migrate`.
type Import struct {
	CAFingerprint string // the data dir's root; the database takes it as its CA
	Users         users.Export
	Deny          []DenyEntry
}

// ImportResult counts what an import wrote.
type ImportResult struct {
	Users, Devices, Tokens, Shares, Deny int
	Again                                bool // the database came from this data dir before
}

// CheckImport says whether in may go into this database: it must be empty, or
// force must be set. A database that an earlier import of the same data dir
// (same CA) filled is refused without force too: the instances have changed it
// since (tokens redeemed, revocations lifted, newer logins), and the data dir's
// older rows would replace theirs. A database of another CA is refused even
// with force (the instances on it would stop trusting each other's devices),
// and so is one with an instance whose heartbeat is newer than live: an import
// under running instances changes what they serve.
func (db *DB) CheckImport(ctx context.Context, in Import, force bool, live time.Duration) (again bool, err error) {
	running, err := db.Instances(ctx, live)
	if err != nil {
		return false, err
	}
	if len(running) > 0 {
		names := make([]string, len(running))
		for i, r := range running {
			names[i] = fmt.Sprintf("%s (seen %s ago)", r.Name, r.Age.Round(time.Second))
		}
		return false, fmt.Errorf("%w: %s; stop every instance first (an instance leaves the list when it stops, a crashed one %s after its last heartbeat), then migrate", ErrInstancesLive, strings.Join(names, ", "), live)
	}
	var ca, from string
	var rows int
	err = db.pool.QueryRow(ctx, `SELECT
		coalesce((SELECT value FROM tp_meta WHERE key = 'ca_root_fingerprint'), ''),
		coalesce((SELECT value FROM tp_meta WHERE key = 'migrated_from_ca'), ''),
		(SELECT count(*) FROM tp_users) + (SELECT count(*) FROM tp_tokens) + (SELECT count(*) FROM tp_denylist)`).Scan(&ca, &from, &rows)
	if err != nil {
		return false, fmt.Errorf("database: %w", err)
	}
	if ca != "" && ca != in.CAFingerprint {
		return false, fmt.Errorf("%w: the database's instances use the CA %s and this data dir's is %s; migrating would leave devices of one untrusted by the other", ErrOtherCA, ca, in.CAFingerprint)
	}
	again = from == in.CAFingerprint
	if again && !force {
		return true, fmt.Errorf("%w, and the instances have changed the database since (tokens redeemed, revocations lifted, logins): migrating again would bring back what the data dir had. Nothing was written. To replace the database's rows with this data dir's anyway, pass --force", ErrMigratedBefore)
	}
	if rows > 0 && !again && !force {
		return false, fmt.Errorf("%w (%d rows); migrate into an empty database, or pass --force to merge this data dir into it (rows of the same name are replaced)", ErrNotEmpty, rows)
	}
	return again, nil
}

// Import writes in into the database in one transaction, replacing rows of the
// same keys, so that running it again changes nothing. Call CheckImport first.
func (db *DB) Import(ctx context.Context, in Import) (ImportResult, error) {
	var res ImportResult
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		for _, u := range in.Users.Users {
			if _, err := tx.Exec(ctx, `INSERT INTO tp_users (name, created, disabled, sso_subject) VALUES ($1, $2, $3, $4)
				ON CONFLICT (name) DO UPDATE SET created = excluded.created, disabled = excluded.disabled, sso_subject = excluded.sso_subject`,
				u.Name, u.Created, u.Disabled, u.SSOSubject); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "DELETE FROM tp_groups WHERE user_name = $1", u.Name); err != nil {
				return err
			}
			for _, g := range users.NormalizeGroups(u.Groups) {
				if _, err := tx.Exec(ctx, "INSERT INTO tp_groups (user_name, group_name) VALUES ($1, $2)", u.Name, g); err != nil {
					return err
				}
			}
			res.Users++
		}
		for _, d := range in.Users.Devices {
			if _, err := tx.Exec(ctx, "INSERT INTO tp_users (name) VALUES ($1) ON CONFLICT DO NOTHING", d.User); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO tp_devices (id, user_name, name, public_key, created, last_login, revoked, revoked_at, sso_subject, scope, granted_by)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
				ON CONFLICT (id) DO UPDATE SET user_name = excluded.user_name, name = excluded.name, public_key = excluded.public_key,
					created = excluded.created, last_login = excluded.last_login, revoked = excluded.revoked, revoked_at = excluded.revoked_at,
					sso_subject = excluded.sso_subject, scope = excluded.scope, granted_by = excluded.granted_by`,
				d.ID, d.User, d.Name, nilIfEmpty(d.PublicKey), d.Created, nilIfZero(d.LastLogin), d.Revoked, nilIfZero(d.RevokedAt), d.SSOSubject, string(d.Scope), d.GrantedBy); err != nil {
				return err
			}
			res.Devices++
		}
		for _, t := range in.Users.Tokens {
			if _, err := tx.Exec(ctx, `INSERT INTO tp_tokens (hash, user_name, device, expires) VALUES ($1, $2, $3, $4)
				ON CONFLICT (hash) DO UPDATE SET user_name = excluded.user_name, device = excluded.device, expires = excluded.expires`,
				t.Hash, t.User, t.Device, t.Expires); err != nil {
				return err
			}
			res.Tokens++
		}
		for _, sh := range in.Users.Shares {
			if _, err := tx.Exec(ctx, `INSERT INTO tp_shares (id, name, guest, user_name, approved_by, created, until, revoked, revoked_at)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
				ON CONFLICT (id) DO UPDATE SET name = excluded.name, guest = excluded.guest, user_name = excluded.user_name,
					approved_by = excluded.approved_by, created = excluded.created, until = excluded.until,
					revoked = excluded.revoked, revoked_at = excluded.revoked_at`,
				sh.ID, sh.Name, sh.Guest, sh.User, sh.By, sh.Created, sh.Until, sh.Revoked, nilIfZero(sh.RevokedAt)); err != nil {
				return err
			}
			res.Shares++
		}
		for _, e := range in.Deny {
			if _, err := tx.Exec(ctx, `INSERT INTO tp_denylist (kind, value, since, device) VALUES ($1, $2, $3, $4)
				ON CONFLICT (kind, value) DO UPDATE SET since = excluded.since, device = excluded.device`,
				e.Kind, e.Value, nilIfZero(e.Since), e.Device); err != nil {
				return err
			}
			res.Deny++
		}
		for k, v := range map[string]string{"ca_root_fingerprint": in.CAFingerprint, "migrated_from_ca": in.CAFingerprint} {
			if _, err := tx.Exec(ctx, "INSERT INTO tp_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value", k, v); err != nil {
				return err
			}
		}
		if err := notify(ctx, tx, TopicUsers); err != nil {
			return err
		}
		return notify(ctx, tx, TopicDeny)
	})
	if err != nil {
		return ImportResult{}, fmt.Errorf("database: import: %w", err)
	}
	return res, nil
}

func nilIfZero(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}

func nilIfEmpty(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return b
}
