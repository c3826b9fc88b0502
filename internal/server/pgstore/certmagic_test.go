package pgstore_test

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// certmagic's storage contract on PostgreSQL, seen from two instances (two
// pools on one database): what one stores the other loads, lists and stats;
// missing keys are fs.ErrNotExist for Load, Stat and List and no error for
// Delete; deleting a directory deletes what is under it.
func TestCertStorageContract(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	a, b := pgstore.NewCertStorage(open(t, dsn)), pgstore.NewCertStorage(open(t, dsn))
	ctx := context.Background()

	files := map[string]string{
		"certificates/ca/www.example.org/www.example.org.crt":  "cert",
		"certificates/ca/www.example.org/www.example.org.key":  "key",
		"certificates/ca/www.example.org/www.example.org.json": "{}",
		"certificates/ca/app.example.org/app.example.org.crt":  "cert2",
		"acme/ca/users/admin/admin.json":                       "account",
	}
	for k, v := range files {
		if err := a.Store(ctx, k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	for k, v := range files {
		got, err := b.Load(ctx, k)
		if err != nil || string(got) != v {
			t.Fatalf("B loads %s: %q %v; want %q", k, got, err, v)
		}
	}
	if err := b.Store(ctx, "acme/ca/users/admin/admin.json", []byte("account2")); err != nil {
		t.Fatal(err)
	}
	if got, _ := a.Load(ctx, "acme/ca/users/admin/admin.json"); string(got) != "account2" {
		t.Fatalf("A after B overwrote the key: %q", got)
	}

	if _, err := a.Load(ctx, "certificates/none"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing key: %v; want fs.ErrNotExist", err)
	}
	if _, err := a.Stat(ctx, "certificates/none"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Stat of a missing key: %v; want fs.ErrNotExist", err)
	}
	if _, err := a.List(ctx, "nothing", true); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("List of a missing directory: %v; want fs.ErrNotExist", err)
	}
	if a.Exists(ctx, "certificates/none") || !a.Exists(ctx, "certificates/ca") || !a.Exists(ctx, "acme/ca/users/admin/admin.json") {
		t.Fatal("Exists is wrong for a missing key, a directory or a key")
	}
	// "certificates/c" is a prefix of a key's text but no directory of it.
	if a.Exists(ctx, "certificates/c") {
		t.Fatal("Exists says a text prefix that is no directory exists")
	}

	ki, err := b.Stat(ctx, "certificates/ca/www.example.org/www.example.org.crt")
	if err != nil || !ki.IsTerminal || ki.Size != 4 || ki.Modified.IsZero() {
		t.Fatalf("Stat of a key: %+v %v", ki, err)
	}
	ki, err = b.Stat(ctx, "certificates/ca/www.example.org/")
	if err != nil || ki.IsTerminal || ki.Key != "certificates/ca/www.example.org" {
		t.Fatalf("Stat of a directory: %+v %v", ki, err)
	}

	got, err := b.List(ctx, "certificates/ca", false)
	if want := []string{"certificates/ca/app.example.org", "certificates/ca/www.example.org"}; err != nil || !slices.Equal(got, want) {
		t.Fatalf("List(certificates/ca, flat) = %q %v; want %q", got, err, want)
	}
	got, err = b.List(ctx, "certificates", true)
	want := []string{
		"certificates/ca",
		"certificates/ca/app.example.org",
		"certificates/ca/app.example.org/app.example.org.crt",
		"certificates/ca/www.example.org",
		"certificates/ca/www.example.org/www.example.org.crt",
		"certificates/ca/www.example.org/www.example.org.json",
		"certificates/ca/www.example.org/www.example.org.key",
	}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("List(certificates, recursive) = %q %v; want %q", got, err, want)
	}

	if err := a.Delete(ctx, "certificates/ca/www.example.org"); err != nil {
		t.Fatal(err)
	}
	if b.Exists(ctx, "certificates/ca/www.example.org/www.example.org.key") || !b.Exists(ctx, "certificates/ca/app.example.org/app.example.org.crt") {
		t.Fatal("deleting a directory left a key under it, or deleted a key beside it")
	}
	if err := a.Delete(ctx, "certificates/ca/www.example.org"); err != nil {
		t.Fatalf("deleting a missing key: %v; want no error", err)
	}

	// Bad input: an oversized value and an oversized key are refused, not truncated.
	if err := a.Store(ctx, "big", bytes.Repeat([]byte{1}, 1<<20+1)); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("storing 1 MiB + 1: %v; want a refusal", err)
	}
	if err := a.Store(ctx, strings.Repeat("k", 2000), []byte("x")); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("storing under a 2000-byte key: %v; want a refusal", err)
	}
}

// A lock held by one instance blocks the other until it is unlocked; a lock
// whose holder stopped extending it (died, froze) is taken once its lease ran
// out on the database's clock, and not before; a holder that lives keeps its
// lock past its lease by extending it.
func TestCertStorageLocks(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	dbA, dbB := open(t, dsn), open(t, dsn)
	a, b := pgstore.NewCertStorage(dbA), pgstore.NewCertStorage(dbB)
	a.LockTTL, b.LockTTL = 3*time.Second, 3*time.Second
	a.LockPoll, b.LockPoll = 20*time.Millisecond, 20*time.Millisecond
	ctx := context.Background()

	if err := a.Lock(ctx, "issue_cert_www.example.org"); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryLock(ctx, "issue_cert_www.example.org"); ok || err != nil {
		t.Fatalf("B's TryLock while A holds the lock: %v %v; want false", ok, err)
	}
	// Another name is independent.
	if err := b.Lock(ctx, "issue_cert_app.example.org"); err != nil {
		t.Fatal(err)
	}
	if err := b.Unlock(ctx, "issue_cert_app.example.org"); err != nil {
		t.Fatal(err)
	}

	got := make(chan error, 1)
	go func() { got <- b.Lock(ctx, "issue_cert_www.example.org") }()
	// Held past two of its leases: A extends it, so B keeps waiting.
	time.Sleep(2 * a.LockTTL)
	select {
	case err := <-got:
		t.Fatalf("B took the lock (%v) while A held and extended it", err)
	default:
	}
	if err := a.Unlock(ctx, "issue_cert_www.example.org"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("B did not get the lock within 30s of A's unlock")
	}
	if err := a.Unlock(ctx, "issue_cert_www.example.org"); err == nil {
		t.Fatal("A unlocked a lock it no longer holds")
	}
	if err := b.Unlock(ctx, "issue_cert_www.example.org"); err != nil {
		t.Fatal(err)
	}

	// A holder that died: its row stays with a lease 5 s ahead on the
	// database's clock. Waiting Lock calls get it only once that has passed.
	if _, err := dbA.Pool().Exec(ctx, `INSERT INTO tp_certmagic_locks (name, token, lease_until)
		VALUES ('dead', 'gone', now() + interval '5 seconds')`); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryLock(ctx, "dead"); ok || err != nil {
		t.Fatalf("B's TryLock while the dead holder's lease runs: %v %v; want false", ok, err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := b.Lock(wctx, "dead"); err != nil {
		t.Fatalf("taking a lock whose holder died: %v", err)
	}
	var early bool
	if err := dbA.Pool().QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM tp_certmagic_locks WHERE name = 'dead' AND token = 'gone')`).Scan(&early); err != nil || early {
		t.Fatalf("the dead holder's row is still there after B took the lock (%v)", err)
	}
	var current bool
	if err := dbA.Pool().QueryRow(ctx, `SELECT lease_until > now() FROM tp_certmagic_locks WHERE name = 'dead'`).Scan(&current); err != nil || !current {
		t.Fatalf("B's lock has no current lease (%v)", err)
	}
	// A Lock whose context ends while it waits returns the context's error.
	cctx, ccancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer ccancel()
	if err := a.Lock(cctx, "dead"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("A's Lock with an ending context while B holds the lock: %v", err)
	}
	if err := b.Unlock(ctx, "dead"); err != nil {
		t.Fatal(err)
	}

	// A holder whose lease ran out (its extensions did not reach the
	// database) loses the lock to another, and is told so when it extends.
	if err := a.Lock(ctx, "lapsed"); err != nil {
		t.Fatal(err)
	}
	if _, err := dbA.Pool().Exec(ctx, `UPDATE tp_certmagic_locks SET lease_until = now() - interval '1 second' WHERE name = 'lapsed'`); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryLock(ctx, "lapsed"); !ok || err != nil {
		t.Fatalf("B's TryLock of a lock whose lease ran out: %v %v; want true", ok, err)
	}
	if err := a.RenewLockLease(ctx, "lapsed", time.Minute); err == nil || !strings.Contains(err.Error(), "lease ran out") {
		t.Fatalf("A extending a lock B took after A's lease ran out: %v; want a refusal", err)
	}
	if err := a.Unlock(ctx, "lapsed"); err != nil {
		t.Fatal(err)
	}
	if ok, err := a.TryLock(ctx, "lapsed"); ok || err != nil {
		t.Fatalf("A's stale Unlock released B's lock: A's TryLock %v %v", ok, err)
	}
	if err := b.Unlock(ctx, "lapsed"); err != nil {
		t.Fatal(err)
	}
}
