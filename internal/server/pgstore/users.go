package pgstore

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

// Users is the user store in PostgreSQL. Writes are transactions judged by the
// database (a token is redeemed once, whichever instance is asked; expiry is on
// the database's clock); reads answer from a snapshot that every instance
// reloads when any instance writes.
type Users struct {
	db   *DB
	snap atomic.Pointer[userSnap]
	mu   sync.Mutex // serialises reloads, so an older snapshot never replaces a newer one
	gen  atomic.Uint64
}

var _ users.Store = (*Users)(nil)

type userSnap struct {
	users   map[string]*users.User
	devices map[string]*users.Device
	tokens  map[string][]users.PendingToken // pending tokens by user
	byKey   map[string]*users.Device        // devices by key (DeviceByKey)
	shares  map[string]*users.Share         // by ID, ended ones included
}

// approvers is what users.Approvers.Gone looks a grant's approver up in.
func (s *userSnap) approvers() users.Approvers {
	return users.Approvers{Devices: s.devices, Users: s.users, Shares: s.shares}
}

// OpenUsers loads the user store and keeps it in step with other instances
// (once Listen runs).
func OpenUsers(ctx context.Context, db *DB) (*Users, error) {
	u := &Users{db: db}
	if err := u.Reload(ctx); err != nil {
		return nil, fmt.Errorf("load users from the database: %w", err)
	}
	db.OnChange(TopicUsers, u.Reload)
	return u, nil
}

// Reload reads users, groups, devices, pending tokens and shares into a new
// snapshot.
func (u *Users) Reload(ctx context.Context) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := &userSnap{users: map[string]*users.User{}, devices: map[string]*users.Device{}, tokens: map[string][]users.PendingToken{}, byKey: map[string]*users.Device{},
		shares: map[string]*users.Share{}}
	err := pgx.BeginTxFunc(ctx, u.db.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		rows, _ := tx.Query(ctx, `SELECT u.name, u.created, u.disabled, u.sso_subject,
			coalesce(array_agg(g.group_name ORDER BY g.group_name) FILTER (WHERE g.group_name IS NOT NULL), '{}')
			FROM tp_users u LEFT JOIN tp_groups g ON g.user_name = u.name GROUP BY u.name`)
		for rows.Next() {
			x := &users.User{}
			if err := rows.Scan(&x.Name, &x.Created, &x.Disabled, &x.SSOSubject, &x.Groups); err != nil {
				return err
			}
			x.Created = x.Created.UTC()
			s.users[x.Name] = x
		}
		if err := rows.Err(); err != nil {
			return err
		}
		rows, _ = tx.Query(ctx, `SELECT id, user_name, name, coalesce(public_key, ''), created, last_login, revoked, revoked_at, sso_subject, scope, granted_by FROM tp_devices`)
		for rows.Next() {
			d := &users.Device{}
			var last, revokedAt *time.Time
			if err := rows.Scan(&d.ID, &d.User, &d.Name, &d.PublicKey, &d.Created, &last, &d.Revoked, &revokedAt, &d.SSOSubject, &d.Scope, &d.GrantedBy); err != nil {
				return err
			}
			d.Created = d.Created.UTC()
			if last != nil {
				d.LastLogin = last.UTC()
			}
			if revokedAt != nil {
				d.RevokedAt = revokedAt.UTC()
			}
			if len(d.PublicKey) == 0 {
				d.PublicKey = nil
			} else {
				s.byKey[string(d.PublicKey)] = d
			}
			s.devices[d.ID] = d
		}
		if err := rows.Err(); err != nil {
			return err
		}
		rows, _ = tx.Query(ctx, `SELECT user_name, device, expires FROM tp_tokens WHERE expires > now() ORDER BY expires, device`)
		for rows.Next() {
			var name string
			var t users.PendingToken
			if err := rows.Scan(&name, &t.Device, &t.Expires); err != nil {
				return err
			}
			t.Expires = t.Expires.UTC()
			s.tokens[name] = append(s.tokens[name], t)
		}
		if err := rows.Err(); err != nil {
			return err
		}
		rows, _ = tx.Query(ctx, `SELECT `+shareColumns+` FROM tp_shares`)
		for rows.Next() {
			sh, err := scanShare(rows)
			if err != nil {
				return err
			}
			s.shares[sh.ID] = &sh
		}
		return rows.Err()
	})
	if err != nil {
		return err
	}
	// A reload that found nothing new (the periodic one, or the echo of this
	// instance's own write) does not make tpd re-check every live session.
	if old := u.snap.Load(); old != nil && reflect.DeepEqual(old, s) {
		return nil
	}
	u.snap.Store(s)
	u.gen.Add(1)
	return nil
}

// afterWrite reloads at once, so that this instance reads its own write
// without waiting for the notification.
func (u *Users) afterWrite() {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if err := u.Reload(ctx); err != nil {
		u.db.log.Warn("reloading users after a change failed; the listener reloads them when the database answers", "err", err)
	}
}

// Enroll implements users.Store.
func (u *Users) Enroll(user, device string, groups []string, ttl time.Duration) (users.Enrollment, error) {
	tok, err := users.CheckEnroll(user, device, groups, ttl)
	if err != nil {
		return users.Enrollment{}, err
	}
	id := authz.DeviceID(user, device)
	var exp time.Time
	err = u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		// One enrollment at a time counts and adds tokens, on every instance.
		// The lock comes first: a delete before it takes a weaker lock on the
		// table, and two enrollments that each held that one while asking
		// for this one deadlocked.
		if _, err := tx.Exec(ctx, "LOCK TABLE tp_tokens IN SHARE ROW EXCLUSIVE MODE"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "DELETE FROM tp_tokens WHERE expires <= now()"); err != nil {
			return err
		}
		var n int
		if err := tx.QueryRow(ctx, "SELECT count(*) FROM tp_tokens").Scan(&n); err != nil {
			return err
		}
		if n >= users.MaxTokens() {
			return users.ErrTooMany
		}
		if _, err := tx.Exec(ctx, "INSERT INTO tp_users (name) VALUES ($1) ON CONFLICT DO NOTHING", user); err != nil {
			return err
		}
		if err := setGroups(ctx, tx, user, groups); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO tp_devices (id, user_name, name) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", id, user, device); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, "INSERT INTO tp_tokens (hash, user_name, device, expires) VALUES ($1, $2, $3, now() + $4 * interval '1 microsecond') RETURNING expires",
			users.HashToken(tok), user, device, ttl.Microseconds()).Scan(&exp); err != nil {
			return err
		}
		return notify(ctx, tx, TopicUsers)
	})
	if errors.Is(err, users.ErrTooMany) {
		return users.Enrollment{}, err
	}
	if err != nil {
		return users.Enrollment{}, unreachable("enroll "+id, err)
	}
	u.afterWrite()
	return users.Enrollment{Token: tok, DeviceID: id, Expires: exp.UTC()}, nil
}

// Redeem implements users.Store: the token's row is deleted by the statement
// that reads it, so of two instances asked at once one wins.
func (u *Users) Redeem(tok string, pub []byte) (users.Device, error) {
	var d users.Device
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		var user, device string
		err := tx.QueryRow(ctx, "DELETE FROM tp_tokens WHERE hash = $1 AND expires > now() RETURNING user_name, device", users.HashToken(tok)).Scan(&user, &device)
		if errors.Is(err, pgx.ErrNoRows) {
			return users.ErrBadToken
		}
		if err != nil {
			return err
		}
		id := authz.DeviceID(user, device)
		if _, err := tx.Exec(ctx, "INSERT INTO tp_users (name) VALUES ($1) ON CONFLICT DO NOTHING", user); err != nil {
			return err
		}
		// Another machine under the name: the grants it approved end
		// (users.File.endGrantsLocked).
		if _, err := tx.Exec(ctx, `UPDATE tp_devices SET revoked = true, revoked_at = now() WHERE granted_by = $1 AND NOT revoked
			AND EXISTS (SELECT 1 FROM tp_devices o WHERE o.id = $1 AND length(coalesce(o.public_key, '')) > 0 AND o.public_key <> $2)`, id, pub); err != nil {
			return err
		}
		// And so do the shares it approved.
		if _, err := tx.Exec(ctx, `UPDATE tp_shares SET revoked = true, revoked_at = now() WHERE approved_by = $1 AND NOT revoked
			AND EXISTS (SELECT 1 FROM tp_devices o WHERE o.id = $1 AND length(coalesce(o.public_key, '')) > 0 AND o.public_key <> $2)`, id, pub); err != nil {
			return err
		}
		err = tx.QueryRow(ctx, `INSERT INTO tp_devices (id, user_name, name, public_key) VALUES ($1, $2, $3, $4)
			ON CONFLICT (id) DO UPDATE SET public_key = excluded.public_key, revoked = false, revoked_at = NULL, sso_subject = ''
			RETURNING id, user_name, name, public_key, created`, id, user, device, pub).Scan(&d.ID, &d.User, &d.Name, &d.PublicKey, &d.Created)
		if err != nil {
			return err
		}
		d.Created = d.Created.UTC()
		return notify(ctx, tx, TopicUsers)
	})
	if errors.Is(err, users.ErrBadToken) {
		return users.Device{}, err
	}
	if err != nil {
		return users.Device{}, unreachable("redeem an enrollment token", err)
	}
	u.afterWrite()
	if cur, err := u.Device(d.ID); err == nil {
		return cur, nil
	}
	return d, nil
}

// Device implements users.Store.
func (u *Users) Device(id string) (users.Device, error) {
	d := u.snap.Load().devices[id]
	if d == nil {
		return users.Device{}, fmt.Errorf("device %s: %w", id, users.ErrNotFound)
	}
	return *d, nil
}

// TouchLogin implements users.Store.
func (u *Users) TouchLogin(id string) error {
	return u.update(id, "UPDATE tp_devices SET last_login = now() WHERE id = $1", "record the login of "+id)
}

// BindUser implements users.Store: the statement that binds is the check,
// so two instances signing in two accounts for one new user bind one.
func (u *Users) BindUser(user, subject string) error {
	if subject == "" {
		return errors.New("no subject to bind the user to")
	}
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		var name string
		err := tx.QueryRow(ctx, `INSERT INTO tp_users (name, sso_subject) VALUES ($1, $2)
			ON CONFLICT (name) DO UPDATE SET sso_subject = excluded.sso_subject
			WHERE tp_users.sso_subject = '' OR tp_users.sso_subject = excluded.sso_subject
			RETURNING name`, user, subject).Scan(&name)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("user %s: %w", user, users.ErrOtherAccount)
		}
		if err != nil {
			return err
		}
		return notify(ctx, tx, TopicUsers)
	})
	if errors.Is(err, users.ErrOtherAccount) {
		return err
	}
	if err != nil {
		return unreachable("bind "+user+" to a sign-in", err)
	}
	u.afterWrite()
	return nil
}

// UnbindUser implements users.Store.
func (u *Users) UnbindUser(user string) (string, error) {
	var was string
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		// The row is locked by the read, so the subject returned is the one
		// this statement cleared.
		err := tx.QueryRow(ctx, "SELECT sso_subject FROM tp_users WHERE name = $1 FOR NO KEY UPDATE", user).Scan(&was)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("user %s: %w", user, users.ErrNotFound)
		}
		if err != nil || was == "" {
			return err
		}
		if _, err := tx.Exec(ctx, "UPDATE tp_users SET sso_subject = '' WHERE name = $1", user); err != nil {
			return err
		}
		// What that account approved ends with the binding.
		if _, err := tx.Exec(ctx, "UPDATE tp_devices SET revoked = true, revoked_at = now() WHERE granted_by = $1 AND NOT revoked", users.SignInApprover+was); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "UPDATE tp_shares SET revoked = true, revoked_at = now() WHERE approved_by = $1 AND NOT revoked", users.SignInApprover+was); err != nil {
			return err
		}
		return notify(ctx, tx, TopicUsers)
	})
	if errors.Is(err, users.ErrNotFound) {
		return "", err
	}
	if err != nil {
		return "", unreachable("unbind "+user, err)
	}
	if was != "" {
		u.afterWrite()
	}
	return was, nil
}

// EnrollSignIn implements users.Store in one transaction: the user's row
// is locked first, so that sign-ins of one user on every instance count and
// insert one at a time, and the insert takes only a name that is free (no
// row, or a reserved one without a key that is not revoked). A guest's
// sign-in (in.Share) then locks the share's row, so that its guests on every
// instance are counted one at a time, and a revocation of the share or of its
// approver comes wholly before or after.
func (u *Users) EnrollSignIn(in users.SignIn) (users.Device, error) {
	if err := users.CheckSignIn(in); err != nil {
		return users.Device{}, err
	}
	id := authz.DeviceID(in.User, in.Device)
	var d users.Device
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "INSERT INTO tp_users (name) VALUES ($1) ON CONFLICT DO NOTHING", in.User); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SELECT 1 FROM tp_users WHERE name = $1 FOR NO KEY UPDATE", in.User); err != nil {
			return err
		}
		// A name already enrolled or revoked is refused as such, before the
		// count.
		var taken bool
		if err := tx.QueryRow(ctx, "SELECT revoked OR length(coalesce(public_key, '')) > 0 FROM tp_devices WHERE id = $1", id).Scan(&taken); err == nil && taken {
			return deviceTaken(ctx, tx, id)
		} else if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		rows, _ := tx.Query(ctx, `SELECT id, public_key, sso_subject, revoked FROM tp_devices
			WHERE user_name = $1 AND id <> $2 AND sso_subject <> '' AND NOT revoked AND length(coalesce(public_key, '')) > 0
			AND NOT (granted_by LIKE 'share:%' AND NOT EXISTS (SELECT 1 FROM tp_shares s
				WHERE 'share:' || s.id = tp_devices.granted_by AND NOT s.revoked AND s.until > now()))`, in.User, id)
		var mine []users.Device
		for rows.Next() {
			var d users.Device
			if err := rows.Scan(&d.ID, &d.PublicKey, &d.SSOSubject, &d.Revoked); err != nil {
				return err
			}
			mine = append(mine, d)
		}
		if err := rows.Err(); err != nil {
			return err
		}
		n := in.Counted(mine)
		if n >= in.Max {
			return fmt.Errorf("user %s has %d: %w", in.User, n, users.ErrTooManyDevices)
		}
		var scope authz.Scope
		var grantedBy string
		if in.Share != "" {
			var err error
			if scope, err = shareForGuestTx(ctx, tx, id, in.Share); err != nil {
				return err
			}
			grantedBy = users.ShareApprover + in.Share
		}
		// The WHERE is the check that counts: a name another instance took
		// since the look above is left as it is, and no row comes back. A
		// guest's device takes the share's scope and is granted by it; any
		// other keeps what a reserved name has.
		err := tx.QueryRow(ctx, `INSERT INTO tp_devices (id, user_name, name, public_key, sso_subject, scope, granted_by) VALUES ($1, $2, $3, $4, $5, $6, $7)
			ON CONFLICT (id) DO UPDATE SET public_key = excluded.public_key, sso_subject = excluded.sso_subject,
				scope = CASE WHEN excluded.granted_by <> '' THEN excluded.scope ELSE tp_devices.scope END,
				granted_by = CASE WHEN excluded.granted_by <> '' THEN excluded.granted_by ELSE tp_devices.granted_by END
			WHERE NOT tp_devices.revoked AND length(coalesce(tp_devices.public_key, '')) = 0
			RETURNING id, user_name, name, public_key, created, sso_subject, scope, granted_by`, id, in.User, in.Device, in.PublicKey, in.Subject, string(scope), grantedBy).
			Scan(&d.ID, &d.User, &d.Name, &d.PublicKey, &d.Created, &d.SSOSubject, &d.Scope, &d.GrantedBy)
		if errors.Is(err, pgx.ErrNoRows) {
			return deviceTaken(ctx, tx, id)
		}
		if err != nil {
			return err
		}
		d.Created = d.Created.UTC()
		if err := setGroups(ctx, tx, in.User, in.Groups); err != nil {
			return err
		}
		return notify(ctx, tx, TopicUsers)
	})
	if errors.Is(err, users.ErrDeviceExists) || errors.Is(err, users.ErrDeviceRevoked) || errors.Is(err, users.ErrTooManyDevices) ||
		errors.Is(err, users.ErrShareEnded) || errors.Is(err, users.ErrShareFull) {
		return users.Device{}, err
	}
	if err != nil {
		return users.Device{}, unreachable("enrol "+id+" by sign-in", err)
	}
	u.afterWrite()
	return d, nil
}

// shareForGuestTx locks the share a guest's sign-in for the device id names
// and says the scope it gives (authz.GuestScope of its name): ErrShareEnded
// when the share is gone, revoked, past its end or its approver is not live;
// ErrShareFull when it has users.MaxGuestsPerShare devices not revoked.
func shareForGuestTx(ctx context.Context, tx pgx.Tx, id, shareID string) (authz.Scope, error) {
	var sh users.Share
	var ended bool
	err := tx.QueryRow(ctx, "SELECT name, guest, user_name, approved_by, until, revoked, until <= now() FROM tp_shares WHERE id = $1 FOR UPDATE", shareID).
		Scan(&sh.Name, &sh.Guest, &sh.User, &sh.By, &sh.Until, &sh.Revoked, &ended)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return "", fmt.Errorf("share %s: %w", shareID, users.ErrShareEnded)
	case err != nil:
		return "", err
	case sh.Revoked:
		return "", fmt.Errorf("the share of %s with %s (%s) was revoked: %w", sh.Name, sh.Guest, shareID, users.ErrShareEnded)
	case ended:
		return "", fmt.Errorf("the share of %s with %s (%s) ended at %s; ask %s to share it again: %w",
			sh.Name, sh.Guest, shareID, sh.Until.UTC().Format(time.RFC3339), sh.User, users.ErrShareEnded)
	}
	live := false
	if !strings.HasPrefix(sh.By, users.ShareApprover) { // never so (users.CheckShare)
		if live, err = approverLiveTx(ctx, tx, &users.Device{ID: id, User: sh.User, GrantedBy: sh.By}); err != nil {
			return "", err
		}
	}
	if !live {
		return "", fmt.Errorf("the share of %s with %s (%s) ended with its approver %s: %w", sh.Name, sh.Guest, shareID, sh.By, users.ErrShareEnded)
	}
	var guests int
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM tp_devices WHERE granted_by = $1 AND NOT revoked", users.ShareApprover+shareID).Scan(&guests); err != nil {
		return "", err
	}
	if guests >= users.MaxGuestsPerShare {
		return "", fmt.Errorf("share %s has %d guests' devices: %w", shareID, guests, users.ErrShareFull)
	}
	scope, err := authz.GuestScope(sh.Name)
	if err != nil { // never so (users.CheckShare)
		return "", fmt.Errorf("share %s: %v: %w", shareID, err, users.ErrShareEnded)
	}
	return scope, nil
}

// EnrollGrant implements users.Store: in one transaction that holds the
// user's row, so that the bound counts every instance's grants.
func (u *Users) EnrollGrant(g users.Grant) (users.Device, error) {
	if err := users.CheckGrant(g); err != nil {
		return users.Device{}, err
	}
	id := authz.DeviceID(g.User, g.Device)
	var d users.Device
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		var one int
		if err := tx.QueryRow(ctx, "SELECT 1 FROM tp_users WHERE name = $1 FOR NO KEY UPDATE", g.User).Scan(&one); errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("user %s: %w", g.User, users.ErrNotFound)
		} else if err != nil {
			return err
		}
		var have users.Device
		err := tx.QueryRow(ctx, "SELECT id, user_name, name, coalesce(public_key, ''), created, revoked, scope, granted_by FROM tp_devices WHERE id = $1", id).
			Scan(&have.ID, &have.User, &have.Name, &have.PublicKey, &have.Created, &have.Revoked, &have.Scope, &have.GrantedBy)
		same := err == nil && string(have.PublicKey) == string(g.PublicKey) && have.Scope == g.Scope && !have.Revoked
		if same {
			live, err := approverLiveTx(ctx, tx, &have)
			if err != nil {
				return err
			}
			same = live
		}
		switch {
		case same:
			d, d.Created = have, have.Created.UTC()
			return nil
		case err == nil && (have.Revoked || string(have.PublicKey) == string(g.PublicKey) && have.Scope == g.Scope):
			// Revoked, or the same grant ended with its approver: the
			// application needs a new key.
			return fmt.Errorf("device %s: %w", id, users.ErrDeviceRevoked)
		case err == nil:
			return fmt.Errorf("device %s: %w", id, users.ErrDeviceExists)
		case !errors.Is(err, pgx.ErrNoRows):
			return err
		}
		var holder string
		if err := tx.QueryRow(ctx, "SELECT id FROM tp_devices WHERE public_key = $1 LIMIT 1", g.PublicKey).Scan(&holder); err == nil {
			return fmt.Errorf("device %s: %w", holder, users.ErrKeyInUse)
		} else if !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		rows, _ := tx.Query(ctx, "SELECT id, scope, revoked FROM tp_devices WHERE user_name = $1 AND scope <> '' AND NOT revoked", g.User)
		n := 0
		for rows.Next() {
			var o users.Device
			if err := rows.Scan(&o.ID, &o.Scope, &o.Revoked); err != nil {
				return err
			}
			if g.Counts(o) {
				n++
			}
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if n >= g.Max {
			return fmt.Errorf("user %s has %d scoped devices: %w", g.User, n, users.ErrTooManyDevices)
		}
		err = tx.QueryRow(ctx, `INSERT INTO tp_devices (id, user_name, name, public_key, scope, granted_by) VALUES ($1, $2, $3, $4, $5, $6)
			ON CONFLICT (id) DO NOTHING RETURNING id, user_name, name, public_key, created, scope, granted_by`, id, g.User, g.Device, g.PublicKey, string(g.Scope), g.By).
			Scan(&d.ID, &d.User, &d.Name, &d.PublicKey, &d.Created, &d.Scope, &d.GrantedBy)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("device %s: %w", id, users.ErrDeviceExists) // another instance made it since the look above
		}
		if err != nil {
			return err
		}
		d.Created = d.Created.UTC()
		return notify(ctx, tx, TopicUsers)
	})
	if errors.Is(err, users.ErrDeviceExists) || errors.Is(err, users.ErrDeviceRevoked) || errors.Is(err, users.ErrTooManyDevices) ||
		errors.Is(err, users.ErrNotFound) || errors.Is(err, users.ErrKeyInUse) {
		return users.Device{}, err
	}
	if err != nil {
		return users.Device{}, unreachable("grant "+id, err)
	}
	u.afterWrite()
	return d, nil
}

// DeviceByKey implements users.Store, from the snapshot.
func (u *Users) DeviceByKey(pub []byte) (users.Device, bool) {
	if len(pub) == 0 {
		return users.Device{}, false
	}
	if d := u.snap.Load().byKey[string(pub)]; d != nil {
		return *d, true
	}
	return users.Device{}, false
}

// deviceTaken is the refusal of a sign-in for the device id, which is
// enrolled or revoked.
func deviceTaken(ctx context.Context, tx pgx.Tx, id string) error {
	var revoked bool
	if err := tx.QueryRow(ctx, "SELECT revoked FROM tp_devices WHERE id = $1", id).Scan(&revoked); err != nil {
		return err
	}
	if revoked {
		return fmt.Errorf("device %s: %w", id, users.ErrDeviceRevoked)
	}
	return fmt.Errorf("device %s: %w", id, users.ErrDeviceExists)
}

// SignedIn implements users.Store.
func (u *Users) SignedIn(id, subject string, groups []string) error {
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		var user string
		err := tx.QueryRow(ctx, "UPDATE tp_devices SET sso_subject = $2 WHERE id = $1 RETURNING user_name", id, subject).Scan(&user)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("device %s: %w", id, users.ErrNotFound)
		}
		if err != nil {
			return err
		}
		if err := setGroups(ctx, tx, user, groups); err != nil {
			return err
		}
		return notify(ctx, tx, TopicUsers)
	})
	if errors.Is(err, users.ErrNotFound) {
		return err
	}
	if err != nil {
		return unreachable("record the sign-in of "+id, err)
	}
	u.afterWrite()
	return nil
}

// RevokeDevice implements users.Store: the grants and shares the device
// approved end with it (users.File.endGrantsLocked).
func (u *Users) RevokeDevice(id string) error {
	return u.update(id, `WITH grants AS (UPDATE tp_devices SET revoked = true, revoked_at = now() WHERE granted_by = $1 AND NOT revoked),
		shares AS (UPDATE tp_shares SET revoked = true, revoked_at = now() WHERE approved_by = $1 AND NOT revoked)
		UPDATE tp_devices SET revoked = true, revoked_at = coalesce(revoked_at, now()) WHERE id = $1`, "revoke "+id)
}

// SetScope implements users.Store.
func (u *Users) SetScope(id string, scope authz.Scope) error {
	if _, err := authz.ParseScope(string(scope)); err != nil {
		return err
	}
	return u.update(id, "UPDATE tp_devices SET scope = $2 WHERE id = $1", "set the scope of "+id, string(scope))
}

// Devices implements users.Store, from the snapshot.
func (u *Users) Devices(user string) []users.Device {
	var out []users.Device
	for _, d := range u.snap.Load().devices {
		if d.User == user {
			out = append(out, *d)
		}
	}
	users.SortDevices(out)
	return out
}

// approverLiveTx says whether the approver of d, a grant, is live in the
// database (users.Approvers.Gone): its device there and not revoked, or, for a
// sign-in, its user still bound to that account, or, for a guest's device, its
// share there, neither revoked nor past its end (on the database's clock), and
// the share's own approver live.
func approverLiveTx(ctx context.Context, tx pgx.Tx, d *users.Device) (bool, error) {
	if d.GrantedBy == "" {
		return true, nil
	}
	if shareID, ok := strings.CutPrefix(d.GrantedBy, users.ShareApprover); ok {
		var user, by string
		err := tx.QueryRow(ctx, "SELECT user_name, approved_by FROM tp_shares WHERE id = $1 AND NOT revoked AND until > now()", shareID).Scan(&user, &by)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			return false, nil
		case err != nil:
			return false, err
		case strings.HasPrefix(by, users.ShareApprover):
			return false, nil // never so (users.CheckShare), and not followed round a loop
		}
		return approverLiveTx(ctx, tx, &users.Device{ID: d.ID, User: user, GrantedBy: by})
	}
	if sub, ok := strings.CutPrefix(d.GrantedBy, users.SignInApprover); ok {
		var bound string
		err := tx.QueryRow(ctx, "SELECT sso_subject FROM tp_users WHERE name = $1", d.User).Scan(&bound)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil
		}
		return err == nil && bound == sub, err
	}
	var revoked bool
	err := tx.QueryRow(ctx, "SELECT revoked FROM tp_devices WHERE id = $1", d.GrantedBy).Scan(&revoked)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	return err == nil && !revoked, err
}

// GrantedBy implements authz.Granter, from the snapshot.
func (u *Users) GrantedBy(deviceID string) string {
	s := u.snap.Load()
	if d := s.devices[deviceID]; d != nil {
		return users.Approvers{Shares: s.shares}.By(d.GrantedBy) // a guest's: its share's approver
	}
	return ""
}

// Scope implements authz.Scoper, from the snapshot.
func (u *Users) Scope(deviceID string) authz.Scope {
	if d := u.snap.Load().devices[deviceID]; d != nil {
		return d.Scope
	}
	return ""
}

func (u *Users) update(id, sql, what string, args ...any) error {
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, sql, append([]any{id}, args...)...)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("device %s: %w", id, users.ErrNotFound)
		}
		return notify(ctx, tx, TopicUsers)
	})
	if errors.Is(err, users.ErrNotFound) {
		return err
	}
	if err != nil {
		return unreachable(what, err)
	}
	u.afterWrite()
	return nil
}

// DropTokens implements users.Store.
func (u *Users) DropTokens(user, device string) (int, error) {
	var n int64
	err := u.db.tx(func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, "DELETE FROM tp_tokens WHERE user_name = $1 AND ($2 = '' OR device = $2)", user, device)
		if err != nil {
			return err
		}
		if n = tag.RowsAffected(); n == 0 {
			return nil
		}
		return notify(ctx, tx, TopicUsers)
	})
	if err != nil {
		return 0, unreachable("drop enrollment tokens of "+user, err)
	}
	if n > 0 {
		u.afterWrite()
	}
	return int(n), nil
}

// Lookup implements authz.Directory.
func (u *Users) Lookup(deviceID string) ([]string, error) {
	s := u.snap.Load()
	d := s.devices[deviceID]
	if d == nil || len(d.PublicKey) == 0 {
		return nil, fmt.Errorf("device %s is not enrolled: %w", deviceID, authz.ErrUnknownDevice)
	}
	if err := s.approvers().Gone(d, time.Now()); err != nil {
		return nil, err // said before a revocation the store made with the approver's
	}
	if d.Revoked {
		return nil, fmt.Errorf("device %s: %w", deviceID, authz.ErrRevoked)
	}
	x := s.users[d.User]
	if x == nil {
		return nil, fmt.Errorf("user %s of device %s no longer exists: %w", d.User, deviceID, authz.ErrUnknownDevice)
	}
	if x.Disabled {
		return nil, fmt.Errorf("user %s is disabled: %w", d.User, authz.ErrRevoked)
	}
	return slices.Clone(x.Groups), nil
}

// HasUser implements users.Store.
func (u *Users) HasUser(name string) bool { return u.snap.Load().users[name] != nil }

// Users implements users.Store.
func (u *Users) Users() []users.UserInfo {
	s := u.snap.Load()
	now := time.Now()
	out := make([]users.UserInfo, 0, len(s.users))
	for _, x := range s.users {
		ui := users.UserInfo{User: *x, Devices: []users.Device{}}
		ui.Groups = slices.Clone(x.Groups)
		for _, d := range s.devices {
			if d.User == x.Name {
				dc := *d
				dc.PublicKey = nil
				ui.Devices = append(ui.Devices, dc)
			}
		}
		for _, t := range s.tokens[x.Name] {
			if now.Before(t.Expires) {
				ui.PendingTokens++
				ui.Tokens = append(ui.Tokens, t)
			}
		}
		sort.Slice(ui.Devices, func(i, j int) bool { return ui.Devices[i].ID < ui.Devices[j].ID })
		out = append(out, ui)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Generation implements users.Store: it counts reloads.
func (u *Users) Generation() uint64 { return u.gen.Load() }

// setGroups replaces user's groups with groups in tx; nil leaves them. It
// locks the user's row until tx ends.
func setGroups(ctx context.Context, tx pgx.Tx, user string, groups []string) error {
	if groups == nil {
		return nil
	}
	// One replacement of a user's groups at a time, on every instance: two
	// at once each deleted the rows they saw and inserted theirs, leaving
	// both lists, or deadlocked on a group both insert.
	if _, err := tx.Exec(ctx, "SELECT 1 FROM tp_users WHERE name = $1 FOR NO KEY UPDATE", user); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, "DELETE FROM tp_groups WHERE user_name = $1", user); err != nil {
		return err
	}
	for _, g := range users.NormalizeGroups(groups) {
		if _, err := tx.Exec(ctx, "INSERT INTO tp_groups (user_name, group_name) VALUES ($1, $2)", user, g); err != nil {
			return err
		}
	}
	return nil
}
