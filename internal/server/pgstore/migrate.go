package pgstore

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// migrations are the schema's versions: migrations[i] takes the schema from
// version i to i+1. Append only; never edit one that has shipped.
var migrations = []string{
	// 1: settings every instance must agree on, users, their groups, devices,
	// enrollment tokens, the deny list.
	`CREATE TABLE tp_meta (
		key   text PRIMARY KEY,
		value text NOT NULL
	);
	CREATE TABLE tp_users (
		name     text PRIMARY KEY,
		created  timestamptz NOT NULL DEFAULT now(),
		disabled boolean NOT NULL DEFAULT false
	);
	CREATE TABLE tp_groups (
		user_name  text NOT NULL REFERENCES tp_users (name) ON DELETE CASCADE,
		group_name text NOT NULL,
		PRIMARY KEY (user_name, group_name)
	);
	CREATE TABLE tp_devices (
		id         text PRIMARY KEY,
		user_name  text NOT NULL REFERENCES tp_users (name) ON DELETE CASCADE,
		name       text NOT NULL,
		public_key bytea,
		created    timestamptz NOT NULL DEFAULT now(),
		last_login timestamptz,
		revoked    boolean NOT NULL DEFAULT false,
		revoked_at timestamptz
	);
	CREATE TABLE tp_tokens (
		hash      text PRIMARY KEY,
		user_name text NOT NULL,
		device    text NOT NULL,
		expires   timestamptz NOT NULL
	);
	CREATE INDEX tp_tokens_user ON tp_tokens (user_name);
	CREATE TABLE tp_denylist (
		kind   text NOT NULL CHECK (kind IN ('user', 'device', 'serial')),
		value  text NOT NULL,
		since  timestamptz,
		device text NOT NULL DEFAULT '',
		PRIMARY KEY (kind, value)
	);`,
	// 2: ACME replay nonces, which any instance may be asked to check.
	`CREATE TABLE tp_acme_nonces (
		id      text PRIMARY KEY,
		expires timestamptz NOT NULL
	);
	CREATE INDEX tp_acme_nonces_expires ON tp_acme_nonces (expires);`,
	// 3: reverse names, public ports ("tcp/PORT", "udp/PORT") and pass-through
	// server names ("sni/NAME"): which device holds each, which instance serves
	// it ('' while none does), the epoch every claim raises (the fencing token),
	// the serving instance's lease and the end of the owner's hold, both on the
	// database's clock (holds.go).
	`CREATE TABLE tp_holds (
		key         text PRIMARY KEY,
		owner       text NOT NULL,
		instance    text NOT NULL,
		epoch       bigint NOT NULL,
		lease_until timestamptz NOT NULL,
		expires_at  timestamptz NOT NULL
	);
	CREATE INDEX tp_holds_expires ON tp_holds (expires_at);`,
	// 4: secret keys every instance must share (keys.go): the QUIC stateless
	// reset key and the TLS session-ticket keys of each ticket set.
	`CREATE TABLE tp_keys (
		purpose text NOT NULL,
		created timestamptz NOT NULL DEFAULT clock_timestamp(),
		key     bytea NOT NULL CHECK (length(key) = 32),
		PRIMARY KEY (purpose, created)
	);`,
	// 5: certmagic's storage for site and exposed-name certificates, their
	// keys and the ACME account (certmagic.go), and its named locks, each
	// held by one acquisition until it is unlocked or its lease, on the
	// database's clock, runs out; an index for counting an owner's holds
	// (Holds.MaxPerOwner).
	`CREATE TABLE tp_certmagic (
		key      text PRIMARY KEY,
		value    bytea NOT NULL,
		modified timestamptz NOT NULL DEFAULT now()
	);
	CREATE TABLE tp_certmagic_locks (
		name        text PRIMARY KEY,
		token       text NOT NULL,
		lease_until timestamptz NOT NULL
	);
	CREATE INDEX tp_holds_owner ON tp_holds (owner);`,
	// 6: the running instances and where their peers reach them (peers.go):
	// a dial that lands on one instance for a name another serves is carried
	// there; heartbeat is the database's time of its last sign of life.
	`CREATE TABLE tp_instances (
		name         text PRIMARY KEY,
		peer_address text NOT NULL,
		started      timestamptz NOT NULL DEFAULT now(),
		heartbeat    timestamptz NOT NULL DEFAULT now(),
		policy_revision text NOT NULL DEFAULT ''
	);`,
	// 7: whether the instance is draining (it stopped taking new connections
	// and waits for its live sessions; the row goes when it has stopped), for
	// `tpd status` on any instance.
	`ALTER TABLE tp_instances ADD COLUMN draining boolean NOT NULL DEFAULT false;`,
	// 8 (pgacme): the dns-01 answers reverse-name owners publish for the
	// CA's TXT lookups (acmetxt.go): an agent's challenge request and its
	// answer to the challenge may reach different instances.
	`CREATE TABLE tp_acme_txt (
		host    text NOT NULL,
		value   text NOT NULL,
		expires timestamptz NOT NULL,
		PRIMARY KEY (host, value)
	);
	CREATE INDEX tp_acme_txt_expires ON tp_acme_txt (expires);`,
	// 9 (pghttp): whether a held reverse HTTP name is open to enrolled devices
	// only (tp expose --http --devices-only), written by its claim and read with
	// its route, so that an instance that carries the name's requests to the
	// serving one asks for the device certificate at its own handshake.
	`ALTER TABLE tp_holds ADD COLUMN devices_only boolean NOT NULL DEFAULT false;`,
	// 10: the ID tokens that enrolled a device by single sign-on (ssoused.go),
	// by hash, until they expire: each enrols one device, whichever instance
	// it is shown to.
	`CREATE TABLE tp_sso_used (
		hash    text PRIMARY KEY,
		expires timestamptz NOT NULL
	);
	CREATE INDEX tp_sso_used_expires ON tp_sso_used (expires);`,
	// 11: the identity provider's subject of the person who enrolled a device
	// by single sign-on ('' for one enrolled with a token): with sso-renew:
	// sign-in, its renewals need a fresh sign-in of that subject.
	`ALTER TABLE tp_devices ADD COLUMN sso_subject text NOT NULL DEFAULT '';`,
	// 12: the identity provider's subject of the person a user is, bound by
	// the user's first sign-in (users.User.SSOSubject).
	`ALTER TABLE tp_users ADD COLUMN sso_subject text NOT NULL DEFAULT '';`,
	// 13: a device's scope (authz.Scope), which narrows what it may do before
	// the policy is asked: '' for none.
	`ALTER TABLE tp_devices ADD COLUMN scope text NOT NULL DEFAULT '';`,
	// 14: the device that approved a granted one (users.Device.GrantedBy):
	// '' for a device not granted.
	`ALTER TABLE tp_devices ADD COLUMN granted_by text NOT NULL DEFAULT '';`,
	// 15: guest shares (users.Share): a person's gift of one reverse name
	// (name) to an outside person (guest: an email address or "@domain")
	// until a time, approved by one of their devices or a sign-in
	// (approved_by, users.Share.By), revoked for good with it or by hand.
	// The guests' devices name it in tp_devices.granted_by ("share:ID").
	`CREATE TABLE tp_shares (
		id          text PRIMARY KEY,
		name        text NOT NULL,
		guest       text NOT NULL,
		user_name   text NOT NULL,
		approved_by text NOT NULL,
		created     timestamptz NOT NULL DEFAULT now(),
		until       timestamptz NOT NULL,
		revoked     boolean NOT NULL DEFAULT false,
		revoked_at  timestamptz
	);`,
}

// SchemaVersion is the schema version this tpd creates and understands.
func SchemaVersion() int { return len(migrations) }

// ErrSchemaTooNew means a newer tpd migrated the database.
var ErrSchemaTooNew = errors.New("database schema is newer than this tpd")

// migrate brings the schema to SchemaVersion under the advisory lock, each
// migration in its own transaction, so that of several tpd starting at once
// one migrates and the others find it done.
func (db *DB) migrate(ctx context.Context) error {
	return db.WithLock(ctx, func(ctx context.Context) error {
		if _, err := db.pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
			version integer PRIMARY KEY,
			applied timestamptz NOT NULL DEFAULT now())`); err != nil {
			return fmt.Errorf("database: create schema_version: %w", err)
		}
		var have int
		if err := db.pool.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM schema_version").Scan(&have); err != nil {
			return fmt.Errorf("database: read schema_version: %w", err)
		}
		if have > len(migrations) {
			return fmt.Errorf("%w: the database is at schema version %d and this tpd knows versions up to %d, so a newer tpd has used it; run that newer tpd (an older one could misread or damage its data)", ErrSchemaTooNew, have, len(migrations))
		}
		for v := have; v < len(migrations); v++ {
			err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, migrations[v]); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, "INSERT INTO schema_version (version) VALUES ($1)", v+1)
				return err
			})
			if err != nil {
				return fmt.Errorf("database: migrate the schema to version %d: %w", v+1, err)
			}
			db.log.Info("database schema migrated", "version", v+1)
		}
		return nil
	})
}

// checkVersion refuses a schema other than SchemaVersion without changing it.
func (db *DB) checkVersion(ctx context.Context) error {
	var have int
	if err := db.pool.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM schema_version").Scan(&have); err != nil {
		return fmt.Errorf("database: read schema_version (has a tpd run on this database yet?): %w", err)
	}
	if have != len(migrations) {
		return fmt.Errorf("database: its schema is version %d and this tpd's is %d; start tpd serve of this version once to migrate it, or use the tpd that matches it", have, len(migrations))
	}
	return nil
}
