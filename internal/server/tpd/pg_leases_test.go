package tpd

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
	"github.com/tp-proxy/tp/proxy/wire"
)

// leaseDataDir is pgDataDir with the reverse policy and short lease timings,
// so that fencing happens within a test's patience.
func leaseDataDir(t testing.TB, dsn string, peer *config.Server) config.Server {
	t.Helper()
	cfg := pgDataDir(t, dsn, peer)
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(reversePolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.ReverseLease, cfg.ReverseRenew = 3*time.Second, 500*time.Millisecond
	return cfg
}

// holdRow reads svc's row: its epoch and the instance that serves it.
func holdRow(t *testing.T, dsn string) (epoch int64, instance string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cc, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cc.Password = testpg.Password
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, "SELECT epoch, instance FROM tp_holds WHERE key = 'svc.rev.tp.internal'").Scan(&epoch, &instance); err != nil {
		t.Fatal(err)
	}
	return epoch, instance
}

// clientOn is another Client of the same device (its home) whose server is url.
func clientOn(t testing.TB, c *clients.Client, url string) *clients.Client {
	t.Helper()
	o, err := clients.Open(c.Home)
	if err != nil {
		t.Fatal(err)
	}
	o.Profile.Server = url
	return o
}

// Two instances on one database: alice's agent on A holds svc; mallory's
// claim of svc on B is refused naming the holder; bob reaches svc through A;
// alice's agent moving to B takes svc over with a higher epoch, A ends its
// agent there (taken over), serves svc no more itself and carries its dials
// to B over the peer hop.
func TestPGLeasesHolderAndTakeover(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfgA := leaseDataDir(t, dsn, nil)
	a := runDaemon(t, cfgA)
	b := runDaemon(t, leaseDataDir(t, dsn, &cfgA))
	local := testnet.Upper(t)
	alice, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	mallory, _, _ := enrollClient(t, a.d, b.url, "mallory", "pc")
	bob, _, _ := enrollClient(t, a.d, a.url, "bob", "phone")

	_, errA := startAgent(t, alice, clients.TransportTLS, local, []string{"bob"}, nil)
	epochA, instA := holdRow(t, dsn)
	if got, err := dialReverse(bob, clients.TransportTLS, []byte("hello")); err != nil || string(got) != "HELLO" {
		t.Fatalf("bob through A, where alice's agent is: %q %v", got, err)
	}
	if err := runMallory(t, mallory); err == nil || !strings.Contains(err.Error(), "registered by another identity") {
		t.Fatalf("mallory claiming svc on B while alice's agent serves it on A: %v; want name taken", err)
	}

	startAgent(t, clientOn(t, alice, b.url), clients.TransportTLS, local, []string{"bob"}, nil)
	epochB, instB := holdRow(t, dsn)
	if epochB <= epochA || instB == instA {
		t.Fatalf("after alice's agent moved to B: epoch %d on %s; before: %d on %s; want a higher epoch on another instance", epochB, instB, epochA, instA)
	}
	select {
	case err := <-errA:
		errA <- err // for startAgent's stop
		if err == nil || !strings.Contains(err.Error(), "took over these names on another TP server instance") {
			t.Fatalf("alice's agent on A ended with %v; want taken over", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("alice's agent on A still runs 30s after B took svc over")
	}
	// A serves svc no more itself: a dial through A is carried to B (peering).
	waitFor(t, "A carries dials of svc to B once B took it over", func() bool {
		got, err := dialReverse(bob, clients.TransportTLS, []byte("x"))
		return err == nil && string(got) == "X" && strings.Contains(b.logs.String(), "peer session")
	})
	if got, err := dialReverse(clientOn(t, bob, b.url), clients.TransportTLS, []byte("moved")); err != nil || string(got) != "MOVED" {
		t.Fatalf("bob through B after the move: %q %v", got, err)
	}
}

// A frozen holder: instance A cannot reach the database (its hold store
// fails) longer than its lease. A stops serving svc on its own — its agent is
// told and A refuses dials — while B still refuses svc to another identity
// (no gap), and alice's agent reconnecting to B takes svc there. Never do A
// and B serve svc at once: once B serves it, A carries its dials to B.
func TestPGLeasesSelfFencing(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfgA := leaseDataDir(t, dsn, nil)
	a := runDaemon(t, cfgA)
	b := runDaemon(t, leaseDataDir(t, dsn, &cfgA))
	local := testnet.Upper(t)
	alice, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	mallory, _, _ := enrollClient(t, a.d, b.url, "mallory", "pc")
	bob, _, _ := enrollClient(t, a.d, a.url, "bob", "phone")
	bobB := clientOn(t, bob, b.url)

	stopA, _ := startAgent(t, alice, clients.TransportTLS, local, []string{"bob"}, nil)
	if got, err := dialReverse(bob, clients.TransportTLS, []byte("before")); err != nil || string(got) != "BEFORE" {
		t.Fatalf("bob through A before the freeze: %q %v", got, err)
	}
	var frozen atomic.Bool
	frozen.Store(true)
	a.d.proxy.SetHoldStoreFailHook(frozen.Load)
	waitLog(t, a, "reverse names fenced")
	var re *clients.RefusedError
	if _, err := dialReverse(bob, clients.TransportTLS, []byte("x")); !errors.As(err, &re) ||
		re.Code != wire.CodeReverseOffline && re.Code != wire.CodeReverseUnknown {
		t.Fatalf("bob through A after A fenced svc: %v; want a refusal", err)
	}
	if err := runMallory(t, mallory); err == nil || !strings.Contains(err.Error(), "another identity") {
		t.Fatalf("mallory claiming svc on B after A fenced it: %v; want name taken (alice's hold outlives A's lease)", err)
	}
	stopA() // the agent retrying A (refused: A cannot record holds) stops
	startAgent(t, clientOn(t, alice, b.url), clients.TransportTLS, local, []string{"bob"}, nil)
	if got, err := dialReverse(bobB, clients.TransportTLS, []byte("on b")); err != nil || string(got) != "ON B" {
		t.Fatalf("bob through B after alice's agent moved there: %q %v", got, err)
	}
	// A serves svc no more itself: a dial through A reaches alice's agent on
	// B over the peer hop, and B logs it as a peer session.
	if got, err := dialReverse(bob, clients.TransportTLS, []byte("via a")); err != nil || string(got) != "VIA A" {
		t.Fatalf("bob through A while B serves svc: %q %v; want it carried to B", got, err)
	}
	waitLog(t, b, "peer session")
	frozen.Store(false)
	if got, err := dialReverse(bob, clients.TransportTLS, []byte("again")); err != nil || string(got) != "AGAIN" {
		t.Fatalf("bob through A after it reaches the database again, while B serves svc: %q %v; want it carried to B", got, err)
	}
	waitFor(t, "B logs the second peer session (else A served svc itself)", func() bool {
		return strings.Count(b.logs.String(), "msg=\"peer session\"") >= 2
	})
}

// PostgreSQL stopped longer than the lease under an instance serving svc:
// the instance says so, stops serving svc on its own, refuses the agent's
// reconnections it cannot record, and once PostgreSQL is back the agent's
// retry takes svc again and leases are renewed, without restarting tpd.
func TestPGLeasesOutageAndRecovery(t *testing.T) {
	t.Parallel()
	testpg.SkipIfShort(t)
	srv, err := testpg.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	name, err := srv.CreateDatabase(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	r := runDaemon(t, leaseDataDir(t, srv.DSN(name), nil))
	local := testnet.Upper(t)
	alice, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	bob, _, _ := enrollClient(t, r.d, r.url, "bob", "phone")
	startAgent(t, alice, clients.TransportTLS, local, []string{"bob"}, nil)
	if got, err := dialReverse(bob, clients.TransportTLS, []byte("before")); err != nil || string(got) != "BEFORE" {
		t.Fatalf("bob before the outage: %q %v", got, err)
	}

	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	waitLog(t, r, "cannot renew the leases in the database")
	waitLog(t, r, "reverse names fenced")
	var re *clients.RefusedError
	if _, err := dialReverse(bob, clients.TransportTLS, []byte("x")); !errors.As(err, &re) {
		t.Fatalf("bob during the outage, after svc was fenced: %v; want a refusal", err)
	}
	// The loss is in the metrics: the database is down, renewals failed,
	// and svc was fenced (before, tp_ready stayed 1 and nothing counted).
	waitFor(t, "tp_database_up to say the database is lost", func() bool { return r.d.databaseHealth() != "" })
	during := r.d.proxy.Stats().Leases
	if during.RenewalFailures == 0 || during.Fenced != 1 {
		t.Fatalf("lease counters during the outage: %+v; want failed renewals and one name fenced", during)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "bob reaches svc again after PostgreSQL is back", func() bool {
		got, err := dialReverse(bob, clients.TransportTLS, []byte("after"))
		return err == nil && string(got) == "AFTER"
	})
	waitLog(t, r, "renewing the leases in the database again")
	if after := r.d.proxy.Stats().Leases; after.Renewals <= during.Renewals {
		t.Fatalf("lease renewals after the outage: %+v; before it ended: %+v; want more renewals", after, during)
	}
	waitFor(t, "tp_database_up to say the database is back", func() bool { return r.d.databaseHealth() == "" })
}

// Bad input: tpd started while its database is down. It refuses to start,
// by choice (fail closed: the users, devices and deny list live there, and
// an instance that never read the deny list could let a revoked device in),
// and says so in a sentence that says what to do; running instances ride out
// an outage (TestPGLeasesOutageAndRecovery). Before, it exited at once with
// the driver's error alone.
func TestPGStartWithDatabaseDown(t *testing.T) {
	srv, err := testpg.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	name, err := srv.CreateDatabase(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cfg := leaseDataDir(t, srv.DSN(name), nil)
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	d, err := New(context.Background(), cfg, nil)
	if err == nil {
		d.Close()
		t.Fatal("tpd started with its database down")
	}
	for _, want := range []string{"cannot reach the database", "does not start without its database", "deny list", "Start PostgreSQL"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the error does not say %q:\n%v", want, err)
		}
	}
	// Once the database is back, the same configuration starts.
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	r := runDaemon(t, cfg)
	waitLog(t, r, "shared state in PostgreSQL")
}
