package tpd

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/server/users"
)

// denySaver writes one deny-list change that dl and meta already hold: the
// whole file in the data dir, or one row in the database.
type denySaver func(dl *authz.DenyList, meta denyMeta, kind authz.DenyKind, value string, remove bool) error

// openStores opens the user store and the deny list: files in the data dir,
// or PostgreSQL when database: is set (then shared with every instance using
// the same database, which each hears about through LISTEN/NOTIFY once Serve
// runs the listener).
func (d *Daemon) openStores(ctx context.Context) (*authz.DenyList, error) {
	if d.cfg.Database == "" {
		var err error
		if d.users, err = users.Open(d.cfg.UsersFile()); err != nil {
			return nil, err
		}
		dl, meta, err := loadDenyFile(d.cfg.DenyListFile())
		if err != nil {
			return nil, err
		}
		d.deny = meta
		path := d.cfg.DenyListFile()
		d.denySave = func(dl *authz.DenyList, meta denyMeta, _ authz.DenyKind, _ string, _ bool) error {
			return saveDenyList(path, dl, meta)
		}
		return dl, nil
	}
	pw, err := d.cfg.DatabasePasswordValue()
	if err != nil {
		return nil, err
	}
	db, err := pgstore.Open(ctx, pgstore.Config{DSN: d.cfg.Database, Password: pw, Logger: d.log})
	if errors.Is(err, pgstore.ErrUnreachable) {
		// Fail closed: the users, devices and deny list live there, and an
		// instance that never read the deny list could let a revoked device
		// in. Instances already running ride out an outage (degraded).
		return nil, fmt.Errorf("%w\ntpd does not start without its database: the users, devices and deny list are there, and without them it cannot tell who may connect. Start PostgreSQL or correct database: in %s; instances already running serve on through an outage, and the systemd unit starts tpd again by itself", err, config.FileName)
	}
	if err != nil {
		return nil, err
	}
	d.db = db
	d.certDB = pgstore.NewCertStorage(db)
	if err := db.ClaimCA(ctx, d.pki.Fingerprint()); err != nil {
		d.closeDB()
		return nil, err
	}
	u, err := pgstore.OpenUsers(ctx, db)
	if err != nil {
		d.closeDB()
		return nil, err
	}
	d.users = u
	dl := &authz.DenyList{}
	entries, err := db.DenyEntries(ctx)
	if err != nil {
		d.closeDB()
		return nil, err
	}
	d.deny = fillDeny(dl, entries)
	d.denySave = func(_ *authz.DenyList, meta denyMeta, kind authz.DenyKind, value string, remove bool) error {
		if remove {
			return db.DenyRemove(kind.String(), value)
		}
		return db.DenyAdd(pgstore.DenyEntry{Kind: kind.String(), Value: value,
			Since: meta.since[denyKey(kind, value)], Device: meta.serialDev[value]})
	}
	db.OnChange(pgstore.TopicDeny, func(ctx context.Context) error { return d.reloadDeny(ctx, dl) })
	d.log.Info("shared state in PostgreSQL", "database", pgstore.Describe(d.cfg.Database), "schema_version", pgstore.SchemaVersion())
	return dl, nil
}

// fillDeny makes dl hold entries and returns their metadata.
func fillDeny(dl *authz.DenyList, entries []pgstore.DenyEntry) denyMeta {
	meta := denyMeta{since: map[string]time.Time{}, serialDev: map[string]string{}}
	sets := map[authz.DenyKind][]string{}
	for _, e := range entries {
		var k authz.DenyKind
		switch e.Kind {
		case "user":
			k = authz.DenyUser
		case "device":
			k = authz.DenyDevice
		case "serial":
			k = authz.DenySerial
		default:
			continue // the table's CHECK allows no other kind
		}
		sets[k] = append(sets[k], e.Value)
		if !e.Since.IsZero() {
			meta.since[denyKey(k, e.Value)] = e.Since
		}
		if k == authz.DenySerial && e.Device != "" {
			meta.serialDev[e.Value] = e.Device
		}
	}
	dl.Replace(sets)
	return meta
}

// reloadDeny reads the deny list that another instance changed, and has live
// sessions re-checked at once.
func (d *Daemon) reloadDeny(ctx context.Context, dl *authz.DenyList) error {
	entries, err := d.db.DenyEntries(ctx)
	if err != nil {
		return err
	}
	d.denyMu.Lock()
	d.deny = fillDeny(dl, entries)
	d.denyMu.Unlock()
	d.denyGen.Add(1)
	select {
	case d.kick <- struct{}{}:
	default:
	}
	return nil
}

// openCA opens the embedded CA on the data dir's bbolt database, or on the
// shared database under its schema lock: step-ca creates its tables with
// CREATE TABLE IF NOT EXISTS, which fails when two instances race.
func (d *Daemon) openCA(ctx context.Context, opts acme.CAOptions) (*acme.CA, error) {
	if d.db == nil {
		return acme.NewCA(d.pki, opts)
	}
	opts.DBPath, opts.PostgreSQL = "", d.db.DataSource()
	opts.Nonces = pgstore.NewNonces(d.db) // a nonce from one instance is good on any
	opts.TXT = pgstore.NewTXT(d.db)       // a challenge answer published on one instance is found by any
	var ca *acme.CA
	err := d.db.WithLock(ctx, func(context.Context) error {
		var err error
		ca, err = acme.NewCA(d.pki, opts)
		return err
	})
	return ca, err
}

func (d *Daemon) closeDB() {
	if d.db != nil {
		d.db.Close()
	}
}

// databaseHealth is "" or why the shared database is not usable now.
func (d *Daemon) databaseHealth() string {
	if d.db == nil {
		return ""
	}
	if err := d.db.Health(); err != nil {
		return fmt.Sprintf("database: %v", err)
	}
	return ""
}

// LoadState opens the user store and the deny list that tpd serve on cfg
// uses, for commands that run beside it (tpd policy eval): the data dir's
// files, or the database, which it neither migrates nor changes. done
// releases what it opened.
func LoadState(ctx context.Context, cfg config.Server) (st users.Store, deny *authz.DenyList, done func(), err error) {
	if cfg.Database == "" {
		if st, err = users.Open(cfg.UsersFile()); err != nil {
			return nil, nil, nil, err
		}
		if deny, err = LoadDenyList(cfg.DenyListFile()); err != nil {
			return nil, nil, nil, err
		}
		return st, deny, func() {}, nil
	}
	pw, err := cfg.DatabasePasswordValue()
	if err != nil {
		return nil, nil, nil, err
	}
	db, err := pgstore.Open(ctx, pgstore.Config{DSN: cfg.Database, Password: pw, NoMigrate: true})
	if err != nil {
		return nil, nil, nil, err
	}
	if st, err = pgstore.OpenUsers(ctx, db); err != nil {
		db.Close()
		return nil, nil, nil, err
	}
	entries, err := db.DenyEntries(ctx)
	if err != nil {
		db.Close()
		return nil, nil, nil, err
	}
	deny = &authz.DenyList{}
	fillDeny(deny, entries)
	return st, deny, db.Close, nil
}

// pruneShared bounds the shared single-use tables: the ACME nonces (expired
// ones, and past ca-max-nonces the oldest; the in-memory store does this on
// every nonce) and the records of ID tokens that enrolled a device (expired
// ones), every minute.
func (d *Daemon) pruneShared(ctx context.Context) {
	n, used := pgstore.NewNonces(d.db), pgstore.NewSSOUsed(d.db)
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := n.PruneNonces(ctx, d.cfg.CAMaxNonces); err != nil && ctx.Err() == nil {
			d.log.Warn("pruning ACME nonces in the database failed; tried again in a minute", "err", err)
		}
		if _, err := used.PruneSSOUsed(ctx); err != nil && ctx.Err() == nil {
			d.log.Warn("pruning the records of single sign-ons in the database failed; tried again in a minute", "err", err)
		}
	}
}

// databaseStatus is the database line of tpd status: "" without one.
func (d *Daemon) databaseStatus() string {
	if d.db == nil {
		return ""
	}
	if why := d.databaseHealth(); why != "" {
		return pgstore.Describe(d.cfg.Database) + ": " + strings.TrimPrefix(why, "database: ")
	}
	return fmt.Sprintf("%s: connected, schema version %d", pgstore.Describe(d.cfg.Database), pgstore.SchemaVersion())
}
