package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// An ID token that enrolled a device through one instance is refused by
// every other, and when two instances are shown the same token at once (the
// bad input: a leaked token replayed on all of them), exactly one takes it.
// An expired record is pruned.
func TestSSOUsedAcrossInstances(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	db := open(t, dsn)
	a, b := pgstore.NewSSOUsed(db), pgstore.NewSSOUsed(open(t, dsn))
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)
	if fresh, err := a.UseOnce(ctx, "token-1", exp); err != nil || !fresh {
		t.Fatalf("first use on A: %v, %v; want it taken", fresh, err)
	}
	if fresh, err := b.UseOnce(ctx, "token-1", exp); err != nil || fresh {
		t.Fatalf("the same token on B: %v, %v; want it refused as used", fresh, err)
	}

	var took atomic.Int32
	var wg sync.WaitGroup
	for i := range 16 {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() {
			fresh, err := s.UseOnce(ctx, "token-2", exp)
			if err != nil {
				t.Error(err)
			}
			if fresh {
				took.Add(1)
			}
		})
	}
	wg.Wait()
	if n := took.Load(); n != 1 {
		t.Fatalf("one token shown to two instances 16 times at once was taken %d times; want once", n)
	}

	if _, err := db.Pool().Exec(ctx, "UPDATE tp_sso_used SET expires = now() - interval '1 second' WHERE hash = 'token-1'"); err != nil {
		t.Fatal(err)
	}
	if n, err := a.PruneSSOUsed(ctx); err != nil || n != 1 {
		t.Fatalf("pruning: %d records, %v; want the one expired", n, err)
	}
	if fresh, err := b.UseOnce(ctx, "token-2", exp); err != nil || fresh {
		t.Fatalf("a token not expired after the prune: %v, %v; want it still refused", fresh, err)
	}
}

// A sign-in recorded through one instance (the provider's subject of the
// device's person, and the groups it brought) is what every instance reads;
// a sign-in that brings no groups claim leaves the groups as they are, and
// one for a device that does not exist (the bad input) is ErrNotFound.
func TestSignedInAcrossInstances(t *testing.T) {
	t.Parallel()
	a, b := twoUserStores(t, true)
	en, err := a.Enroll("alice", "laptop", []string{"dev"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Redeem(en.Token, []byte("key")); err != nil {
		t.Fatal(err)
	}
	if err := a.SignedIn("alice@laptop", "s-alice", []string{"ops", "ops"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B reads the sign-in", func() bool {
		d, err := b.Device("alice@laptop")
		g, _ := b.Lookup("alice@laptop")
		return err == nil && d.SSOSubject == "s-alice" && len(g) == 1 && g[0] == "ops"
	})
	if err := a.SignedIn("alice@laptop", "s-alice", nil); err != nil {
		t.Fatal(err)
	}
	if g, err := a.Lookup("alice@laptop"); err != nil || len(g) != 1 || g[0] != "ops" {
		t.Fatalf("groups after a sign-in without a groups claim: %v, %v; want ops kept", g, err)
	}
	if err := a.SignedIn("alice@nothing", "s-alice", nil); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("a sign-in for a device that does not exist: %v; want ErrNotFound", err)
	}
}

// A user is bound to the first account that signs in as it, whichever
// instance is asked: two accounts signing in as one new user on two
// instances at once (the bad input) bind exactly one, and the other gets
// ErrOtherAccount.
func TestBindUserAcrossInstances(t *testing.T) {
	t.Parallel()
	a, b := twoUserStores(t, false)
	var won, other atomic.Int32
	var wg sync.WaitGroup
	for i := range 8 {
		s, sub := a, "s-one"
		if i%2 == 1 {
			s, sub = b, "s-two"
		}
		wg.Go(func() {
			switch err := s.BindUser("alice", sub); {
			case err == nil:
				won.Add(1)
			case errors.Is(err, users.ErrOtherAccount):
				other.Add(1)
			default:
				t.Error(err)
			}
		})
	}
	wg.Wait()
	// One subject's binds all succeed (the first, and its repeats), the
	// other's all fail.
	if won.Load() != 4 || other.Load() != 4 {
		t.Fatalf("8 binds of two accounts to one user: %d took, %d refused; want 4 and 4", won.Load(), other.Load())
	}
}

// A device's scope written on one instance is read on another (schema 13),
// and kept by a new key. Bad input: a scope TP does not know.
func TestScopeAcrossInstances(t *testing.T) {
	t.Parallel()
	a, b := twoUserStores(t, true)
	en, err := a.Enroll("alice", "ci", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.SetScope(en.DeviceID, "admin:all"); err == nil {
		t.Fatal("an unknown scope was recorded")
	}
	if err := a.SetScope(en.DeviceID, "expose-public:ci"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Redeem(en.Token, []byte("key")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B reads the scope", func() bool { return b.Scope("alice@ci") == "expose-public:ci" })
	if err := a.SetScope("alice@nothing", "expose:ci"); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("a scope for a device that does not exist: %v; want ErrNotFound", err)
	}
}

// Enrollment tokens issued at once on two instances (tpd enroll run by
// several administrators or scripts) all succeed. Bad input: 16 enrollments
// at the same moment; the token table's lock was taken after a delete, and
// two of them deadlocked (SQLSTATE 40P01).
func TestConcurrentEnroll(t *testing.T) {
	t.Parallel()
	a, b := twoUserStores(t, false)
	errs := make(chan error, 16)
	for i := range 16 {
		s := a
		if i%2 == 1 {
			s = b
		}
		go func() {
			_, err := s.Enroll(fmt.Sprintf("user%d", i%4), fmt.Sprintf("dev%d", i), []string{"ops"}, time.Hour)
			errs <- err
		}()
	}
	for range 16 {
		if err := <-errs; err != nil {
			t.Errorf("an enrollment beside 15 others: %v", err)
		}
	}
}

// A grant (an application's key, scoped) is created once however many
// instances are asked at the same moment, repeats return it, and the user's
// bound counts every instance's grants. Bad input: 8 approvals of one key at
// once on two instances; a grant past the bound; another key under a taken
// name; a user that does not exist.
func TestEnrollGrantAcrossInstances(t *testing.T) {
	t.Parallel()
	a, b := twoUserStores(t, false)
	if _, err := a.Enroll("alice", "laptop", nil, time.Hour); err != nil {
		t.Fatal(err)
	}
	g := users.Grant{User: "alice", By: "alice@laptop", Device: "grant-aaaa", PublicKey: []byte("app key"), Scope: "expose:ci", Max: 2}
	devs := make(chan error, 8)
	for i := range 8 {
		s := a
		if i%2 == 1 {
			s = b
		}
		go func() {
			d, err := s.EnrollGrant(g)
			if err == nil && (d.Scope != "expose:ci" || string(d.PublicKey) != "app key") {
				err = fmt.Errorf("got %+v", d)
			}
			devs <- err
		}()
	}
	for range 8 {
		if err := <-devs; err != nil {
			t.Errorf("an approval of one key beside 7 others: %v", err)
		}
	}
	if d, ok := b.DeviceByKey([]byte("app key")); !ok || d.ID != "alice@grant-aaaa" || d.Scope != "expose:ci" {
		t.Fatalf("DeviceByKey on B: %+v, %v", d, ok)
	}
	other := g
	other.PublicKey = []byte("another key")
	if _, err := b.EnrollGrant(other); !errors.Is(err, users.ErrDeviceExists) {
		t.Fatalf("another key under a taken grant name: %v; want ErrDeviceExists", err)
	}
	second := users.Grant{User: "alice", By: "alice@laptop", Device: "grant-bbbb", PublicKey: []byte("key 2"), Scope: "expose:ci", Max: 2}
	if _, err := b.EnrollGrant(second); err != nil {
		t.Fatal(err)
	}
	third := users.Grant{User: "alice", By: "alice@laptop", Device: "grant-cccc", PublicKey: []byte("key 3"), Scope: "expose:ci", Max: 2}
	if _, err := a.EnrollGrant(third); !errors.Is(err, users.ErrTooManyDevices) {
		t.Fatalf("a third grant with room for two: %v; want ErrTooManyDevices", err)
	}
	if _, err := b.EnrollGrant(users.Grant{User: "alice", By: "alice@laptop", Device: "grant-ffff", PublicKey: []byte("app key"), Scope: "expose:ci", Max: 9}); !errors.Is(err, users.ErrKeyInUse) {
		t.Fatalf("a second grant of a key a device holds: %v; want ErrKeyInUse", err)
	}
	if _, err := a.EnrollGrant(users.Grant{User: "nobody", By: "nobody@laptop", Device: "grant-dddd", PublicKey: []byte("k"), Scope: "expose:ci", Max: 2}); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("a grant for a user that does not exist: %v; want ErrNotFound", err)
	}
	// A grant is revoked with its approver, on every instance: B's Lookup
	// refuses it once A revoked the approver, naming it.
	if by := b.GrantedBy("alice@grant-aaaa"); by != "alice@laptop" {
		t.Fatalf("GrantedBy on B = %q, want alice@laptop", by)
	}
	if err := a.RevokeDevice("alice@laptop"); err != nil {
		t.Fatal(err)
	}
	if err := b.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Lookup("alice@grant-aaaa"); !errors.Is(err, authz.ErrRevoked) || !strings.Contains(err.Error(), "granted by alice@laptop, which has been revoked") {
		t.Fatalf("a grant whose approver was revoked, on B: %v; want ErrRevoked naming the approver", err)
	}
}

// twoUserStores opens the user store twice on one fresh database, as two
// instances do; with listen, the second follows the first's writes through
// the database's notifications.
func twoUserStores(t *testing.T, listen bool) (a, b *pgstore.Users) {
	t.Helper()
	_, dsn := testpg.NewDatabase(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	dbA, dbB := open(t, dsn), open(t, dsn)
	a, err := pgstore.OpenUsers(ctx, dbA)
	if err != nil {
		t.Fatal(err)
	}
	if b, err = pgstore.OpenUsers(ctx, dbB); err != nil {
		t.Fatal(err)
	}
	if listen {
		go dbB.Listen(ctx)
		waitFor(t, "B's listener connected", func() bool { return dbB.Health() == nil })
	}
	return a, b
}

// On the database too a grant does not come back with its approver's name:
// another key under the approver's name, or its account unbound, ends the
// grants for good, and a revocation of the approver marks them. Bad input:
// the approver enrolled again with a new key on instance A, read on B; the
// same account bound again after an unbind.
func TestGrantsEndForGoodAcrossInstances(t *testing.T) {
	t.Parallel()
	a, b := twoUserStores(t, false)
	enrol := func(key string) {
		t.Helper()
		e, err := a.Enroll("alice", "laptop", nil, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.Redeem(e.Token, []byte(key)); err != nil {
			t.Fatal(err)
		}
	}
	enrol("laptop key")
	g1, err := a.EnrollGrant(users.Grant{User: "alice", By: "alice@laptop", Device: "grant-aaaa", PublicKey: []byte("app a"), Scope: "expose:ci", Max: 9})
	if err != nil {
		t.Fatal(err)
	}
	enrol("laptop key")
	if err := b.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Lookup(g1.ID); err != nil {
		t.Fatalf("the grant after its approver enrolled again with the same key: %v", err)
	}
	enrol("another key")
	if err := b.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if d, _ := b.Device(g1.ID); !d.Revoked {
		t.Fatal("the grant lives on after its approver's name got another key")
	}

	if err := a.BindUser("alice", "s-alice"); err != nil {
		t.Fatal(err)
	}
	g2, err := a.EnrollGrant(users.Grant{User: "alice", By: users.SignInApprover + "s-alice", Device: "grant-bbbb", PublicKey: []byte("app b"), Scope: "expose:ci", Max: 9})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.UnbindUser("alice"); err != nil {
		t.Fatal(err)
	}
	if err := b.BindUser("alice", "s-alice"); err != nil {
		t.Fatal(err)
	}
	if err := a.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if d, _ := a.Device(g2.ID); !d.Revoked {
		t.Fatal("the grant approved by a sign-in lives on after its account was unbound and bound again")
	}
}
