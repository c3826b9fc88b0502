package pgstore_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testpar"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// TestMain runs many tests at once (testpar): each has a database of its own
// and mostly waits on PostgreSQL.
func TestMain(m *testing.M) {
	testpar.Default(8)
	os.Exit(testpg.Main(m))
}

func open(t *testing.T, dsn string) *pgstore.DB {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	db, err := pgstore.Open(ctx, pgstore.Config{DSN: dsn, Password: testpg.Password})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	return db
}

func TestCheckDSNRefusesPasswords(t *testing.T) {
	t.Parallel()
	for _, dsn := range []string{
		"postgres://tp:secret@db.example/tp",
		"postgresql://tp@db.example/tp?password=secret",
		"host=db.example user=tp password=secret dbname=tp",
	} {
		err := pgstore.CheckDSN(dsn)
		if err == nil || !strings.Contains(err.Error(), "TP_DATABASE_PASSWORD") {
			t.Errorf("CheckDSN(%q) = %v; want a refusal naming TP_DATABASE_PASSWORD", dsn, err)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("CheckDSN(%q) echoes the password: %v", dsn, err)
		}
	}
	for _, dsn := range []string{"postgres://tp@db.example:5432/tp?sslmode=verify-full", "host=db.example user=tp dbname=tp"} {
		if err := pgstore.CheckDSN(dsn); err != nil {
			t.Errorf("CheckDSN(%q) = %v; want nil", dsn, err)
		}
	}
}

// Several tpd starting at once on an empty database: one migrates, all
// open, and the schema is at this version once.
func TestConcurrentMigration(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			db, err := pgstore.Open(ctx, pgstore.Config{DSN: dsn, Password: testpg.Password})
			if err == nil {
				db.Close()
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("one of 4 concurrent opens failed: %v", err)
		}
	}
	db := open(t, dsn)
	var n, v int
	if err := db.Pool().QueryRow(context.Background(), "SELECT count(*), max(version) FROM schema_version").Scan(&n, &v); err != nil {
		t.Fatal(err)
	}
	if n != pgstore.SchemaVersion() || v != pgstore.SchemaVersion() {
		t.Fatalf("schema_version has %d rows up to version %d; want %d rows up to %d", n, v, pgstore.SchemaVersion(), pgstore.SchemaVersion())
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	db := open(t, dsn)
	future := pgstore.SchemaVersion() + 1
	if _, err := db.Pool().Exec(context.Background(), "INSERT INTO schema_version (version) VALUES ($1)", future); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := pgstore.Open(ctx, pgstore.Config{DSN: dsn, Password: testpg.Password})
	if !errors.Is(err, pgstore.ErrSchemaTooNew) {
		t.Fatalf("opening a database at schema version %d: %v; want ErrSchemaTooNew", future, err)
	}
}

func TestWrongPassword(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := pgstore.Open(ctx, pgstore.Config{DSN: dsn, Password: "wrong"})
	if err == nil || !strings.Contains(err.Error(), "cannot reach the database") {
		t.Fatalf("password \"wrong\": %v; want a refusal", err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 30s: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Two instances: an enrollment on A is redeemed on B, once; a revocation on B
// reaches A's lookups through LISTEN/NOTIFY.
func TestUsersAcrossInstances(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dbA, dbB := open(t, dsn), open(t, dsn)
	a, err := pgstore.OpenUsers(ctx, dbA)
	if err != nil {
		t.Fatal(err)
	}
	b, err := pgstore.OpenUsers(ctx, dbB)
	if err != nil {
		t.Fatal(err)
	}
	go dbA.Listen(ctx)
	go dbB.Listen(ctx)
	waitFor(t, "both listeners connected", func() bool { return dbA.Health() == nil && dbB.Health() == nil })

	en, err := a.Enroll("alice", "laptop", []string{"ops", "dev", "ops"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if time.Until(en.Expires) < 59*time.Minute || time.Until(en.Expires) > 61*time.Minute {
		t.Errorf("token expires at %s; want about an hour from now", en.Expires)
	}
	waitFor(t, "B sees alice's pending token", func() bool {
		us := b.Users()
		return len(us) == 1 && us[0].PendingTokens == 1
	})
	dev, err := b.Redeem(en.Token, []byte("device-key"))
	if err != nil {
		t.Fatal(err)
	}
	if dev.ID != "alice@laptop" || string(dev.PublicKey) != "device-key" {
		t.Fatalf("redeemed device %+v", dev)
	}
	if _, err := a.Redeem(en.Token, []byte("other-key")); !errors.Is(err, users.ErrBadToken) {
		t.Fatalf("redeeming the same token again on the other instance: %v; want ErrBadToken", err)
	}
	waitFor(t, "A sees the enrolled device", func() bool {
		g, err := a.Lookup("alice@laptop")
		return err == nil && strings.Join(g, ",") == "dev,ops"
	})
	gen := a.Generation()
	if err := b.RevokeDevice("alice@laptop"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A refuses the device revoked on B", func() bool {
		_, err := a.Lookup("alice@laptop")
		return err != nil
	})
	if a.Generation() == gen {
		t.Error("A's generation did not change when B revoked a device")
	}
	if err := a.RevokeDevice("nobody@nothing"); !errors.Is(err, users.ErrNotFound) {
		t.Errorf("revoking an unknown device: %v; want ErrNotFound", err)
	}
	if _, err := b.Redeem("not-a-token", nil); !errors.Is(err, users.ErrBadToken) {
		t.Errorf("redeeming a made-up token: %v; want ErrBadToken", err)
	}
}

// A token past its lifetime (on the database's clock) is refused.
func TestExpiredTokenRefused(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	db := open(t, dsn)
	u, err := pgstore.OpenUsers(context.Background(), db)
	if err != nil {
		t.Fatal(err)
	}
	en, err := u.Enroll("bob", "phone", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(context.Background(), "UPDATE tp_tokens SET expires = now() - interval '1 second'"); err != nil {
		t.Fatal(err)
	}
	if _, err := u.Redeem(en.Token, []byte("k")); !errors.Is(err, users.ErrBadToken) {
		t.Fatalf("redeeming a token that expired a second ago: %v; want ErrBadToken", err)
	}
}

// A nonce handed out by one instance is good once on another; a made-up, an
// expired or a used one is not; pruning keeps at most max.
func TestNoncesAcrossInstances(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	a, b := pgstore.NewNonces(open(t, dsn)), pgstore.NewNonces(open(t, dsn))
	ctx := context.Background()
	n, err := a.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := b.Use(ctx, n); !ok || err != nil {
		t.Fatalf("A's nonce on B: %v, %v; want accepted", ok, err)
	}
	if ok, _ := a.Use(ctx, n); ok {
		t.Fatal("a nonce used on B was accepted again on A")
	}
	if ok, _ := a.Use(ctx, "AAAAAAAAAAAAAAAAAAAAAA"); ok {
		t.Fatal("a nonce never handed out was accepted")
	}
	old, err := a.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	db := open(t, dsn)
	if _, err := db.Pool().Exec(ctx, "UPDATE tp_acme_nonces SET expires = now() - interval '1 second' WHERE id = $1", old); err != nil {
		t.Fatal(err)
	}
	if ok, _ := b.Use(ctx, old); ok {
		t.Fatal("a nonce that expired a second ago was accepted")
	}
	for range 5 {
		if _, err := a.Create(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.PruneNonces(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if got := a.Len(); got != 3 {
		t.Fatalf("%d nonces after pruning to 3", got)
	}
}
