package tpd

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpar"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// TestMain runs many tests at once (testpar): each starts its own daemons and
// spends most of its time waiting on them.
func TestMain(m *testing.M) {
	testpar.Default(8)
	os.Exit(testpg.Main(m))
}

// pgDataDir is newDataDir for an instance on the database dsn. With peer set,
// the new instance gets peer's CA (ca/ without its bbolt file), as every
// instance on one database must.
func pgDataDir(t testing.TB, dsn string, peer *config.Server) config.Server {
	t.Helper()
	dataDir := filepath.Join(t.TempDir(), "data")
	if peer != nil {
		if err := os.MkdirAll(filepath.Join(dataDir, "ca"), 0o700); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"root.crt", "root.key", "intermediate.crt", "intermediate.key", "attestation-root.crt", "attestation-root.key"} {
			b, err := os.ReadFile(filepath.Join(peer.CADir(), f))
			if err == nil {
				err = os.WriteFile(filepath.Join(dataDir, "ca", f), b, 0o600)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	cfg := config.DefaultServer()
	cfg.DataDir = dataDir
	cfg.PolicyTimeout = 5 * time.Second
	cfg.QUIC = false
	cfg.Database = dsn
	cfg.DatabasePassword = testpg.Password
	if _, err := Init(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(allowAlice), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// Two tpd on one database: a device enrolled on A logs in (enrollment, ACME
// with the shared CA database) on B, and dials through both; a revocation on A
// closes the device's live session on B and B refuses it from then on; the
// bbolt file of the embedded default is not used.
func TestPGTwoInstancesShareUsersAndDenyList(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfgA := pgDataDir(t, dsn, nil)
	a := runDaemon(t, cfgA)
	cfgB := pgDataDir(t, dsn, &cfgA)
	b := runDaemon(t, cfgB)
	waitLog(t, a, "shared state in PostgreSQL")
	echo := testnet.Echo(t)

	c, _, _ := enrollClient(t, a.d, b.url, "alice", "laptop") // enrolled on A, logs in on B
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatalf("dial through B, where the device logged in: %v", err)
	}
	c.Profile.Server = a.url
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatalf("dial through A with the certificate B's CA issued: %v", err)
	}
	c.Profile.Server = b.url
	if _, err := a.d.ca.Prune(context.Background(), time.Now(), 48*time.Hour); err != nil {
		t.Errorf("pruning the CA's tables in PostgreSQL: %v", err)
	}
	for _, cfg := range []config.Server{cfgA, cfgB} {
		if _, err := os.Stat(acme.DBPath(cfg.DataDir)); !os.IsNotExist(err) {
			t.Errorf("%s exists (%v): the CA used bbolt, not the database", acme.DBPath(cfg.DataDir), err)
		}
	}

	// The dial through A closed its tunnel; A ends the session once the echo
	// service's side has ended too, a moment later.
	waitFor(t, "A's session of the dial through it ended", func() bool { return a.d.proxy.Live() == 0 })
	live := openSession(t, c, echo) // on B
	res, err := a.d.Revoke(context.Background(), "device", "alice@laptop", false)
	if err != nil {
		t.Fatal(err)
	}
	if res.Closed != 0 {
		t.Errorf("revoking on A closed %d sessions on A; the live one is on B", res.Closed)
	}
	waitClosed(t, live)
	waitLog(t, b, "deny list changed on another instance")
	if err := dialEcho(t, c, echo); err == nil {
		t.Fatal("B let the device revoked on A connect")
	}
	if es := b.d.DenyEntries(); len(es) != 1 || es[0].Value != "alice@laptop" || es[0].Since.IsZero() {
		t.Fatalf("B's deny list: %+v; want alice@laptop with its time", es)
	}
	if _, err := b.d.Revoke(context.Background(), "device", "alice@laptop", true); err != nil {
		t.Fatal(err)
	}
	c.Profile.Server = a.url
	waitFor(t, "A lets the device in again after B removed the entry", func() bool { return dialEcho(t, c, echo) == nil })
}

// A second instance whose CA differs from the one the database's instances use
// is refused at start, naming both fingerprints.
func TestPGOtherCARefused(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfgA := pgDataDir(t, dsn, nil)
	runDaemon(t, cfgA)
	cfgB := pgDataDir(t, dsn, nil) // a CA of its own
	_, err := New(context.Background(), cfgB, nil)
	if err == nil || !strings.Contains(err.Error(), "same ca/ directory") {
		t.Fatalf("an instance with another CA on the same database: %v; want a refusal", err)
	}
}

// PostgreSQL stopped under a running tpd: tpd says so (log, readyz's reason),
// keeps serving enrolled devices from what it loaded, refuses enrollments and
// revocations with a sentence, and recovers by itself when PostgreSQL is back.
func TestPGOutageAndRecovery(t *testing.T) {
	t.Parallel()
	testpg.SkipIfShort(t)
	srv, err := testpg.New() // its own server: stopping it touches no other test
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	ctx := context.Background()
	name, err := srv.CreateDatabase(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cfg := pgDataDir(t, srv.DSN(name), nil)
	cfg.AdminListen = "127.0.0.1:0" // for /readyz
	r := runDaemon(t, cfg)
	echo := testnet.Echo(t)
	c, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	waitFor(t, "the listener is connected", func() bool { return r.d.databaseHealth() == "" })

	carol, err := r.d.Users().Enroll("carol", "pc", nil, time.Hour) // redeemed during the outage
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	waitLog(t, r, "lost the database")
	root, err := login.FetchRoot(ctx, r.url, r.d.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	key, err := clients.NewDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	_, err = login.EnrollDevice(ctx, login.HTTPClient(root), r.url, carol.Token, key)
	if err == nil || !strings.Contains(err.Error(), "cannot reach its database") || !strings.Contains(err.Error(), "the token was not used") {
		t.Fatalf("dlogin's enrollment while PostgreSQL is stopped: %v; want a refusal saying the database is unreachable", err)
	}
	if code, body := readyz(t, r.d); code != http.StatusOK || !strings.Contains(body, "ready (degraded)") || !strings.Contains(body, "database is unreachable") {
		t.Fatalf("/readyz while PostgreSQL is stopped: %d %q; want 200, degraded, naming the database", code, body)
	}
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatalf("an enrolled device while PostgreSQL is stopped: %v; want served from what tpd loaded", err)
	}
	if st := r.d.Status(context.Background()).Database; !strings.Contains(st, "database is unreachable") {
		t.Fatalf("tpd status while PostgreSQL is stopped says %q", st)
	}
	_, err = r.d.Users().Enroll("bob", "phone", nil, time.Hour)
	if err == nil || !strings.Contains(err.Error(), "the database did not answer") {
		t.Fatalf("enroll while PostgreSQL is stopped: %v; want a refusal saying the database did not answer", err)
	}
	_, err = r.d.Revoke(ctx, "device", "alice@laptop", false)
	if err == nil || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("revoke while PostgreSQL is stopped: %v; want a refusal saying nothing was changed", err)
	}
	if len(r.d.DenyEntries()) != 0 {
		t.Fatalf("a refused revocation left an entry: %+v", r.d.DenyEntries())
	}

	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	waitLog(t, r, "the database is back")
	waitFor(t, "/readyz says ready after PostgreSQL is back", func() bool {
		code, body := readyz(t, r.d)
		return code == http.StatusOK && body == "ready\n"
	})
	if _, err := r.d.Users().Enroll("bob", "phone", nil, time.Hour); err != nil {
		t.Fatalf("enroll after PostgreSQL came back: %v", err)
	}
	if _, err := login.EnrollDevice(ctx, login.HTTPClient(root), r.url, carol.Token, key); err != nil {
		t.Fatalf("the same enrollment after PostgreSQL came back: %v", err)
	}
	if _, err := r.d.Revoke(ctx, "device", "alice@laptop", false); err != nil {
		t.Fatalf("revoke after PostgreSQL came back: %v", err)
	}
	if err := dialEcho(t, c, echo); err == nil {
		t.Fatal("a device revoked after the outage still connects")
	}
}

// The schema a newer tpd left is refused with a sentence, before anything is served.
func TestPGNewerSchemaRefused(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfg := pgDataDir(t, dsn, nil)
	ctx := context.Background()
	db, err := pgstore.Open(ctx, pgstore.Config{DSN: dsn, Password: testpg.Password})
	if err != nil {
		t.Fatal(err)
	}
	_, err = db.Pool().Exec(ctx, "INSERT INTO schema_version (version) VALUES ($1)", pgstore.SchemaVersion()+1)
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(ctx, cfg, nil)
	if err == nil || !strings.Contains(err.Error(), "a newer tpd has used it") {
		t.Fatalf("tpd on a database of schema version %d: %v; want a refusal", pgstore.SchemaVersion()+1, err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 30s: %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// tpd migrate: a single-process data dir (an enrolled, logged-in device, a
// pending token, a deny-list entry, the CA database) moves into PostgreSQL;
// migrating again changes nothing; the same data dir then serves from the
// database: the device dials with its certificate and logs in again (its ACME
// account came along), the deny list still refuses. A database holding another
// deployment's rows is refused without --force, another CA's even with it.
func TestPGMigrateDataDir(t *testing.T) {
	t.Parallel()
	cfg := newDataDir(t, map[string]string{"tp.rego": allowAlice})
	r := runDaemon(t, cfg)
	echo := testnet.Echo(t)
	c, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	if _, err := r.d.Users().Enroll("bob", "phone", []string{"ops"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := r.d.Users().SetScope("bob@phone", "expose:phone"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.Users().Enroll("mallory", "pc", nil, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.Revoke(context.Background(), "user", "mallory", false); err != nil {
		t.Fatal(err)
	}
	r.stop()

	_, dsn := testpg.NewDatabase(t)
	cfg.Database, cfg.DatabasePassword = dsn, testpg.Password
	ctx := context.Background()
	res, err := Migrate(ctx, cfg, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.Users != 3 || res.Devices != 3 || res.Tokens != 1 || res.Deny != 1 || res.CA.Rows == 0 || res.Again {
		t.Fatalf("migrate: %+v; want 3 users, 3 devices, 1 token (bob's; mallory's was dropped at the revocation), 1 deny entry, CA rows", res)
	}
	// Bad input: the same migration again. The database is the instances'
	// state from the first migration on; a second one would roll it back.
	if _, err := Migrate(ctx, cfg, false); !errors.Is(err, pgstore.ErrMigratedBefore) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("migrating the same data dir again without --force: %v; want ErrMigratedBefore, naming --force", err)
	}

	r2 := runDaemon(t, cfg) // the same data dir, now on PostgreSQL
	waitLog(t, r2, "shared state in PostgreSQL")
	waitLog(t, r2, "peering with the other instances")
	// Bad input: a migration while an instance serves from the database,
	// refused even with --force.
	if _, err := Migrate(ctx, cfg, true); !errors.Is(err, pgstore.ErrInstancesLive) {
		t.Fatalf("migrating while an instance runs on the database, with --force: %v; want ErrInstancesLive", err)
	}
	c.Profile.Server = r2.url
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatalf("dial with the certificate issued before the migration: %v", err)
	}
	if _, err := c.Login(ctx, nil); err != nil {
		t.Fatalf("login after the migration: %v", err)
	}
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatalf("dial after logging in on the migrated CA database: %v", err)
	}
	if es := r2.d.DenyEntries(); len(es) != 1 || es[0].Value != "mallory" {
		t.Fatalf("deny list after the migration: %+v", es)
	}
	var bob users.UserInfo
	for _, u := range r2.d.Users().Users() {
		if u.Name == "bob" {
			bob = u
		}
	}
	if bob.PendingTokens != 1 || strings.Join(bob.Groups, ",") != "ops" {
		t.Fatalf("bob after the migration: %+v; want his pending token and group ops", bob)
	}
	if sc := r2.d.Users().Scope("bob@phone"); sc != "expose:phone" {
		t.Fatalf("bob@phone's scope after the migration: %q; want expose:phone", sc)
	}

	r2.stop()
	again, err := Migrate(ctx, cfg, true)
	if err != nil {
		t.Fatalf("migrating the same data dir again with --force, no instance running: %v", err)
	}
	if !again.Again || again.Users != res.Users {
		t.Fatalf("second migrate with --force: %+v; first: %+v", again, res)
	}

	other := newDataDir(t, map[string]string{"tp.rego": allowAlice}) // another CA
	other.Database, other.DatabasePassword = dsn, testpg.Password
	if _, err := Migrate(ctx, other, true); !errors.Is(err, pgstore.ErrOtherCA) {
		t.Fatalf("migrating a data dir of another CA with --force: %v; want ErrOtherCA", err)
	}
	// A database with rows that did not come from this data dir.
	_, dsn2 := testpg.NewDatabase(t)
	db, err := pgstore.Open(ctx, pgstore.Config{DSN: dsn2, Password: testpg.Password})
	if err != nil {
		t.Fatal(err)
	}
	u, err := pgstore.OpenUsers(ctx, db)
	if err == nil {
		_, err = u.Enroll("eve", "pc", nil, time.Hour)
	}
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Database = dsn2
	if _, err := Migrate(ctx, cfg, false); !errors.Is(err, pgstore.ErrNotEmpty) {
		t.Fatalf("migrating into a database holding eve: %v; want ErrNotEmpty", err)
	}
	if _, err := Migrate(ctx, cfg, true); err != nil {
		t.Fatalf("the same with --force: %v", err)
	}
}

func readyz(t *testing.T, d *Daemon) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + d.AdminAddr() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// Three instances starting at once on an empty database: the schema is
// migrated once and the CA's tables created once (step-ca's CREATE TABLE IF
// NOT EXISTS races without the schema lock), and all three start.
func TestPGConcurrentStart(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	first := pgDataDir(t, dsn, nil)
	cfgs := []config.Server{first, pgDataDir(t, dsn, &first), pgDataDir(t, dsn, &first)}
	errs := make(chan error, len(cfgs))
	for _, cfg := range cfgs {
		go func() {
			d, err := New(context.Background(), cfg, nil)
			if err == nil {
				d.Close()
			}
			errs <- err
		}()
	}
	for range cfgs {
		if err := <-errs; err != nil {
			t.Errorf("one of three instances starting at once: %v", err)
		}
	}
}
