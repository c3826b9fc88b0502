package pgstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/jackc/pgx/v5"
)

// Bounds of what certmagic may store: its values are certificates, keys and
// small JSON documents, its keys paths of a few names.
const (
	certKeyMax   = 1024
	certValueMax = 1 << 20
)

// CertStorage is a certmagic.Storage in tp_certmagic, shared by every
// instance on the database, so that a site's certificate obtained by one
// instance is loaded by the others instead of ordered again, and the ACME
// account is one.
//
// Its locks (certmagic takes one around each order and renewal) are rows of
// tp_certmagic_locks: taking one is a single statement that succeeds only if
// the row is absent or its lease has run out on the database's clock, so two
// instances never hold one lock at once, whatever their clocks say. While an
// instance holds a lock it extends the lease every LockTTL/3; an instance
// that dies or freezes loses the lock LockTTL after its last extension, and a
// waiting instance takes it then.
type CertStorage struct {
	db *DB
	// LockTTL is a lock's lease (default 30 s); LockPoll how often a waiting
	// Lock tries again (default 500 ms).
	LockTTL, LockPoll time.Duration

	mu   sync.Mutex
	held map[string]*heldLock // by lock name: this process's acquisitions
}

type heldLock struct {
	token string
	stop  context.CancelFunc
	done  chan struct{}
}

var (
	_ certmagic.Storage          = (*CertStorage)(nil)
	_ certmagic.TryLocker        = (*CertStorage)(nil)
	_ certmagic.LockLeaseRenewer = (*CertStorage)(nil)
)

// NewCertStorage is the certmagic storage on db.
func NewCertStorage(db *DB) *CertStorage {
	return &CertStorage{db: db, held: map[string]*heldLock{}}
}

func (s *CertStorage) ttl() time.Duration {
	if s.LockTTL > 0 {
		return s.LockTTL
	}
	return 30 * time.Second
}

func (s *CertStorage) poll() time.Duration {
	if s.LockPoll > 0 {
		return s.LockPoll
	}
	return 500 * time.Millisecond
}

func checkCertKey(key string) error {
	if len(key) > certKeyMax {
		return fmt.Errorf("certificate storage: a key of %d bytes (at most %d)", len(key), certKeyMax)
	}
	return nil
}

// clean is certmagic's key without a trailing slash, "" for the root.
func clean(key string) string { return strings.Trim(key, "/") }

// Store implements certmagic.Storage.
func (s *CertStorage) Store(ctx context.Context, key string, value []byte) error {
	key = clean(key)
	if err := checkCertKey(key); err != nil {
		return err
	}
	if key == "" {
		return errors.New("certificate storage: storing under an empty key")
	}
	if len(value) > certValueMax {
		return fmt.Errorf("certificate storage: %s is %d bytes (at most %d)", key, len(value), certValueMax)
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	_, err := s.db.pool.Exec(ctx, `INSERT INTO tp_certmagic (key, value, modified) VALUES ($1, $2, now())
		ON CONFLICT (key) DO UPDATE SET value = excluded.value, modified = excluded.modified`, key, value)
	if err != nil {
		return fmt.Errorf("certificate storage: storing %s in the database: %w", key, err)
	}
	return nil
}

// Load implements certmagic.Storage; a missing key is fs.ErrNotExist.
func (s *CertStorage) Load(ctx context.Context, key string) ([]byte, error) {
	key = clean(key)
	if err := checkCertKey(key); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var v []byte
	err := s.db.pool.QueryRow(ctx, "SELECT value FROM tp_certmagic WHERE key = $1", key).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("certificate storage: %s: %w", key, fs.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("certificate storage: loading %s from the database: %w", key, err)
	}
	return v, nil
}

// Delete implements certmagic.Storage: the key and every key under it as a
// directory; a missing key is no error.
func (s *CertStorage) Delete(ctx context.Context, key string) error {
	key = clean(key)
	if err := checkCertKey(key); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	q, args := "DELETE FROM tp_certmagic WHERE key = $1 OR starts_with(key, $1 || '/')", []any{key}
	if key == "" {
		q, args = "DELETE FROM tp_certmagic", nil
	}
	if _, err := s.db.pool.Exec(ctx, q, args...); err != nil {
		return fmt.Errorf("certificate storage: deleting %s from the database: %w", key, err)
	}
	return nil
}

// Exists implements certmagic.Storage: a key, or a directory some key is under.
func (s *CertStorage) Exists(ctx context.Context, key string) bool {
	_, err := s.Stat(ctx, key)
	return err == nil
}

// Stat implements certmagic.Storage; a key is terminal, a prefix of other
// keys a directory, anything else fs.ErrNotExist.
func (s *CertStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	key = clean(key)
	if err := checkCertKey(key); err != nil {
		return certmagic.KeyInfo{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var (
		size     int64
		modified time.Time
		dir      bool
	)
	err := s.db.pool.QueryRow(ctx, "SELECT length(value), modified FROM tp_certmagic WHERE key = $1", key).Scan(&size, &modified)
	if err == nil {
		return certmagic.KeyInfo{Key: key, Modified: modified, Size: size, IsTerminal: true}, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return certmagic.KeyInfo{}, fmt.Errorf("certificate storage: reading %s in the database: %w", key, err)
	}
	err = s.db.pool.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM tp_certmagic WHERE $1 = '' OR starts_with(key, $1 || '/'))", key).Scan(&dir)
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("certificate storage: reading %s in the database: %w", key, err)
	}
	if !dir {
		return certmagic.KeyInfo{}, fmt.Errorf("certificate storage: %s: %w", key, fs.ErrNotExist)
	}
	return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
}

// List implements certmagic.Storage: the keys and directories directly under
// dir, or with recursive every key and directory below it, as FileStorage
// lists them; an empty directory is fs.ErrNotExist.
func (s *CertStorage) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	dir = clean(dir)
	if err := checkCertKey(dir); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	prefix := dir + "/"
	if dir == "" {
		prefix = ""
	}
	rows, err := s.db.pool.Query(ctx, "SELECT key FROM tp_certmagic WHERE starts_with(key, $1) ORDER BY key", prefix)
	if err != nil {
		return nil, fmt.Errorf("certificate storage: listing %s in the database: %w", dir, err)
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("certificate storage: listing %s in the database: %w", dir, err)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("certificate storage: %s: %w", dir, fs.ErrNotExist)
	}
	seen := map[string]bool{}
	var out []string
	add := func(k string) {
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	for _, k := range keys {
		parts := strings.Split(strings.TrimPrefix(k, prefix), "/")
		if !recursive {
			add(prefix + parts[0])
			continue
		}
		for i := range parts {
			add(prefix + strings.Join(parts[:i+1], "/"))
		}
	}
	slices.Sort(out)
	return out, nil
}

// Lock implements certmagic.Locker: it takes the named lock, waiting while
// another acquisition (of any instance, or of this one) holds it and its
// lease has not run out, until ctx ends.
func (s *CertStorage) Lock(ctx context.Context, name string) error {
	for {
		ok, err := s.TryLock(ctx, name)
		if err != nil || ok {
			return err
		}
		t := time.NewTimer(s.poll())
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("certificate storage: waiting for the lock %s: %w", name, ctx.Err())
		case <-t.C:
		}
	}
}

// TryLock implements certmagic.TryLocker: one statement takes the lock if it
// is free or its lease ran out on the database's clock.
func (s *CertStorage) TryLock(ctx context.Context, name string) (bool, error) {
	if err := checkCertKey(name); err != nil {
		return false, err
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return false, err
	}
	token := hex.EncodeToString(b[:])
	qctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	tag, err := s.db.pool.Exec(qctx, `INSERT INTO tp_certmagic_locks AS l (name, token, lease_until)
		VALUES ($1, $2, now() + $3 * interval '1 microsecond')
		ON CONFLICT (name) DO UPDATE SET token = excluded.token, lease_until = excluded.lease_until
		WHERE l.lease_until < now()`, name, token, micros(s.ttl()))
	if err != nil {
		return false, fmt.Errorf("certificate storage: taking the lock %s in the database: %w", name, err)
	}
	if tag.RowsAffected() != 1 {
		return false, nil
	}
	kctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	h := &heldLock{token: token, stop: stop, done: make(chan struct{})}
	s.mu.Lock()
	s.held[name] = h
	s.mu.Unlock()
	go s.keepLock(kctx, name, h)
	return true, nil
}

// keepLock extends the lease of a held lock every third of LockTTL until
// Unlock. If an extension fails (the database is unreachable), the lock may
// run out: certmagic's locks guard idempotent work, so the worst case is one
// order too many, never a damaged certificate.
func (s *CertStorage) keepLock(ctx context.Context, name string, h *heldLock) {
	defer close(h.done)
	t := time.NewTicker(s.ttl() / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := s.renew(ctx, name, h.token, s.ttl())
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, errLockLost):
			s.db.log.Warn("certificate storage: a lock's lease ran out and another acquisition took it", "lock", name)
			return
		case err != nil:
			s.db.log.Warn("certificate storage: cannot extend a lock's lease in the database", "lock", name, "err", err)
		}
	}
}

// errLockLost: the lock's row is gone or another acquisition's.
var errLockLost = errors.New("no longer this instance's (its lease ran out)")

func (s *CertStorage) renew(ctx context.Context, name, token string, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	tag, err := s.db.pool.Exec(ctx, `UPDATE tp_certmagic_locks SET lease_until = now() + $3 * interval '1 microsecond'
		WHERE name = $1 AND token = $2`, name, token, micros(d))
	if err != nil {
		return err
	}
	if tag.RowsAffected() != 1 {
		return fmt.Errorf("the lock %s: %w", name, errLockLost)
	}
	return nil
}

// RenewLockLease implements certmagic.LockLeaseRenewer.
func (s *CertStorage) RenewLockLease(ctx context.Context, name string, d time.Duration) error {
	s.mu.Lock()
	h := s.held[name]
	s.mu.Unlock()
	if h == nil {
		return fmt.Errorf("certificate storage: the lock %s is not held here", name)
	}
	if err := s.renew(ctx, name, h.token, d); err != nil {
		return fmt.Errorf("certificate storage: extending the lock %s: %w", name, err)
	}
	return nil
}

// Unlock implements certmagic.Locker: it releases this process's
// acquisition of the lock (a lease that ran out and was taken by another is
// left alone).
func (s *CertStorage) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	h := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if h == nil {
		return fmt.Errorf("certificate storage: unlocking %s, which this instance does not hold", name)
	}
	h.stop()
	<-h.done
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), opTimeout)
	defer cancel()
	if _, err := s.db.pool.Exec(ctx, "DELETE FROM tp_certmagic_locks WHERE name = $1 AND token = $2", name, h.token); err != nil {
		return fmt.Errorf("certificate storage: releasing the lock %s in the database (it ends with its lease): %w", name, err)
	}
	return nil
}
