package tpd

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/caddyserver/certmagic"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/server/users"
)

// MigrateResult says what Migrate moved.
type MigrateResult struct {
	pgstore.ImportResult
	CA          acme.CACopy
	Fingerprint string
	// SiteFiles is how many files of the sites directory (certificates, keys,
	// ACME accounts) went into the certificate storage.
	SiteFiles int
}

// Migrate moves a single-process data dir (cfg.DataDir: users, devices,
// groups, enrollment tokens, guest shares, the deny list, the CA database) into the
// PostgreSQL database cfg.Database, creating its schema. The tpd of that data
// dir must be stopped, and no instance may run on the database. Migrating the
// same data dir again, or into a database holding anything else, is refused
// unless force. The data dir itself
// is left as it was; its ca/ directory is what every instance on the database
// needs.
func Migrate(ctx context.Context, cfg config.Server, force bool) (MigrateResult, error) {
	var res MigrateResult
	if cfg.Database == "" {
		return res, errors.New("migrate needs a target: --database postgres://USER@HOST:PORT/DB (its password from database-password-file or TP_DATABASE_PASSWORD)")
	}
	if _, err := os.Stat(cfg.CADir()); err != nil {
		return res, fmt.Errorf("%s has no CA (%v): is --data-dir the data dir of a tpd that has run?", cfg.DataDir, err)
	}
	pki, err := acme.LoadPKI(cfg.CADir())
	if err != nil {
		return res, err
	}
	res.Fingerprint = pki.Fingerprint()
	us, err := users.Open(cfg.UsersFile())
	if err != nil {
		return res, err
	}
	dl, meta, err := loadDenyFile(cfg.DenyListFile())
	if err != nil {
		return res, err
	}
	in := pgstore.Import{CAFingerprint: res.Fingerprint, Users: us.Export()}
	for _, k := range denyKinds {
		for _, v := range dl.Entries(k.kind) {
			e := pgstore.DenyEntry{Kind: k.kind.String(), Value: v, Since: meta.since[denyKey(k.kind, v)]}
			if k.kind.String() == "serial" {
				e.Device = meta.serialDev[v]
			}
			in.Deny = append(in.Deny, e)
		}
	}
	pw, err := cfg.DatabasePasswordValue()
	if err != nil {
		return res, err
	}
	db, err := pgstore.Open(ctx, pgstore.Config{DSN: cfg.Database, Password: pw})
	if err != nil {
		return res, err
	}
	defer db.Close()
	again, err := db.CheckImport(ctx, in, force, 3*cfg.ReverseRenew) // as instanceStale
	if err != nil {
		return res, err
	}
	// The CA first and the rest last: the marker that makes a second run
	// welcome is written only once everything is in.
	err = db.WithLock(ctx, func(context.Context) error {
		var err error
		res.CA, err = acme.CopyCADatabase(acme.DBPath(cfg.DataDir), db.DataSource())
		return err
	})
	if err != nil {
		return res, err
	}
	if res.SiteFiles, err = migrateSites(ctx, cfg, pgstore.NewCertStorage(db)); err != nil {
		return res, err
	}
	if res.ImportResult, err = db.Import(ctx, in); err != nil {
		return res, err
	}
	res.Again = again
	return res, nil
}

// migrateSites copies the sites directory (certmagic's files: certificates,
// their keys, ACME accounts; not its locks) into the certificate storage, so
// that the instances serve the certificates the single tpd had instead of
// ordering them again. With the embedded CA the files go under the issuer
// every instance uses for it (sitestore.go).
func migrateSites(ctx context.Context, cfg config.Server, to *pgstore.CertStorage) (int, error) {
	root := cfg.SitesDir()
	if _, err := os.Stat(root); errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	embeddedSuffix := certmagic.StorageKeys.Safe((&certmagic.ACMEIssuer{CA: "https://x" + acme.SitesDirectoryPath()}).IssuerKey())
	embeddedSuffix = strings.TrimPrefix(embeddedSuffix, "x")
	n := 0
	err := filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !e.Type().IsRegular() {
			return nil
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		key := filepath.ToSlash(rel)
		if strings.HasPrefix(key, "locks/") {
			return nil
		}
		if parts := strings.SplitN(key, "/", 3); cfg.ACMECA == "" && len(parts) == 3 && strings.HasSuffix(parts[1], embeddedSuffix) {
			key = parts[0] + "/" + embeddedIssuer + "/" + parts[2]
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if err := to.Store(ctx, key, b); err != nil {
			return err
		}
		n++
		return nil
	})
	if err != nil {
		return n, fmt.Errorf("migrating the site certificates in %s: %w", root, err)
	}
	return n, nil
}
