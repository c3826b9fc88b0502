package pgstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/users"
)

// opTimeout bounds one statement or transaction of the stores.
const opTimeout = 10 * time.Second

// connectTimeout bounds establishing one connection.
const connectTimeout = 10 * time.Second

// migrateLock is the advisory lock key under which one tpd at a time migrates
// the schema or creates the CA's tables ("tp-mgr" in ASCII).
const migrateLock int64 = 0x74702d6d6772

// CheckDSN accepts a PostgreSQL DSN that carries no password and that pgx
// can parse (config.CheckDatabaseDSN says why a password is refused).
func CheckDSN(dsn string) error {
	if err := config.CheckDatabaseDSN(dsn); err != nil {
		return err
	}
	if _, err := pgx.ParseConfig(dsn); err != nil {
		return fmt.Errorf("the database DSN is not valid: %v", redactErr(err))
	}
	return nil
}

// redactErr keeps a parse error's message from echoing what it parsed.
func redactErr(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err.Error()
	}
	return err.Error()
}

// Config says how to reach the database.
type Config struct {
	// DSN names the server, user and database, without a password (CheckDSN).
	DSN string
	// Password, when not empty, is the user's password.
	Password string
	// MaxConns bounds the pool (0: pgxpool's default, at least 4).
	MaxConns int32
	// NoMigrate opens a database whose schema is at this tpd's version and
	// changes nothing, for commands that only read (tpd policy eval).
	NoMigrate bool
	Logger    *slog.Logger
}

// DB is tpd's connection to PostgreSQL. Close releases it.
type DB struct {
	pool *pgxpool.Pool
	conn *pgx.ConnConfig // for the listener's own connection
	dsn  string          // DSN with the password, for step-ca's driver; never logged
	log  *slog.Logger

	mu        sync.Mutex
	reloaders map[string][]func(context.Context) error // by notification topic
	health    error                                    // nil while the listener is connected
}

// Open connects, checks the server answers, and migrates the schema to this
// tpd's version (see migrate.go).
func Open(ctx context.Context, cfg Config) (*DB, error) {
	if err := CheckDSN(cfg.DSN); err != nil {
		return nil, err
	}
	pc, err := pgxpool.ParseConfig(cfg.DSN)
	if err != nil {
		return nil, fmt.Errorf("the database DSN is not valid: %v", redactErr(err))
	}
	if cfg.Password != "" {
		pc.ConnConfig.Password = cfg.Password
	}
	if pc.ConnConfig.ConnectTimeout == 0 || pc.ConnConfig.ConnectTimeout > connectTimeout {
		pc.ConnConfig.ConnectTimeout = connectTimeout
	}
	if cfg.MaxConns > 0 {
		pc.MaxConns = cfg.MaxConns
	}
	pc.HealthCheckPeriod = 5 * time.Second
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	db := &DB{conn: pc.ConnConfig.Copy(), dsn: withPassword(cfg.DSN, cfg.Password), log: log,
		reloaders: map[string][]func(context.Context) error{}}
	if db.pool, err = pgxpool.NewWithConfig(ctx, pc); err != nil {
		return nil, fmt.Errorf("database: %w", err)
	}
	pctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	if err := db.pool.Ping(pctx); err != nil {
		db.pool.Close()
		return nil, fmt.Errorf("cannot reach the database %s: %w: %w", Describe(cfg.DSN), ErrUnreachable, err)
	}
	if cfg.NoMigrate {
		err = db.checkVersion(ctx)
	} else {
		err = db.migrate(ctx)
	}
	if err != nil {
		db.pool.Close()
		return nil, err
	}
	return db, nil
}

// ErrUnreachable is wrapped by Open's error when the database did not answer.
var ErrUnreachable = errors.New("it did not answer")

// Describe names a DSN's user, host and database for logs and errors.
func Describe(dsn string) string {
	c, err := pgx.ParseConfig(dsn)
	if err != nil {
		return "(unparsable DSN)"
	}
	return fmt.Sprintf("%s@%s:%d/%s", c.User, c.Host, c.Port, c.Database)
}

// withPassword puts the password into the DSN, in memory only, for drivers
// that take nothing but a DSN (step-ca's).
func withPassword(dsn, password string) string {
	if password == "" {
		return dsn
	}
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		u.User = url.UserPassword(u.User.Username(), password)
		return u.String()
	}
	return dsn + " password='" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(password) + "'"
}

// DataSource is the DSN with the password, for step-ca's nosql driver. It must
// never be logged or shown.
func (db *DB) DataSource() string { return db.dsn }

// Pool is the connection pool.
func (db *DB) Pool() *pgxpool.Pool { return db.pool }

// Close releases the pool.
func (db *DB) Close() { db.pool.Close() }

// WithLock runs fn while holding the cluster-wide advisory lock that schema
// changes take, so that several tpd starting at once do them one at a time.
func (db *DB) WithLock(ctx context.Context, fn func(context.Context) error) error {
	c, err := db.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("database: %w", err)
	}
	defer c.Release()
	if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", migrateLock); err != nil {
		return fmt.Errorf("database: take the schema lock: %w", err)
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), opTimeout)
		defer cancel()
		if _, err := c.Exec(uctx, "SELECT pg_advisory_unlock($1)", migrateLock); err != nil {
			// The lock ends with the session: drop the connection.
			c.Conn().Close(uctx)
		}
	}()
	return fn(ctx)
}

// Health is nil while the database is reachable and this tpd hears other
// instances' changes, else why not, in words for an operator.
func (db *DB) Health() error {
	db.mu.Lock()
	defer db.mu.Unlock()
	return db.health
}

func (db *DB) setHealth(err error) (changed bool) {
	db.mu.Lock()
	defer db.mu.Unlock()
	changed = (err == nil) != (db.health == nil)
	db.health = err
	return changed
}

// tx runs fn in a transaction bounded by opTimeout.
func (db *DB) tx(fn func(ctx context.Context, tx pgx.Tx) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error { return fn(ctx, tx) }); err != nil {
		return err
	}
	return nil
}

// errUnavailable marks unreachable's errors as users.ErrUnavailable without
// adding words to them.
var errUnavailable = silent{users.ErrUnavailable}

type silent struct{ err error }

func (s silent) Error() string { return "" }
func (s silent) Unwrap() error { return s.err }

// unreachable words a database failure for the person who asked for a change.
func unreachable(what string, err error) error {
	return fmt.Errorf("%s: the database did not answer (%w); nothing was changed — try again when it is back%w", what, err, errUnavailable)
}
