package pgstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// twoInstances is two user stores on one database, as two tpd have.
func twoInstances(t *testing.T) (a, b *pgstore.Users) {
	t.Helper()
	_, dsn := testpg.NewDatabase(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var err error
	if a, err = pgstore.OpenUsers(ctx, open(t, dsn)); err != nil {
		t.Fatal(err)
	}
	if b, err = pgstore.OpenUsers(ctx, open(t, dsn)); err != nil {
		t.Fatal(err)
	}
	return a, b
}

// The bad input: sixteen sign-ins for one new name at the same moment on
// two instances, each with its own key, against a name that does not exist
// and against one reserved by a token never redeemed. Exactly one enrols;
// the others are ErrDeviceExists and did not replace its key.
func TestEnrollSignInAcrossInstances(t *testing.T) {
	t.Parallel()
	for _, reserved := range []bool{false, true} {
		a, b := twoInstances(t)
		if reserved {
			if _, err := a.Enroll("alice", "laptop", nil, time.Hour); err != nil {
				t.Fatal(err)
			}
		}
		const n = 16
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i := range n {
			s := a
			if i%2 == 1 {
				s = b
			}
			wg.Go(func() {
				_, errs[i] = s.EnrollSignIn(users.SignIn{User: "alice", Device: "laptop", PublicKey: []byte{byte(i + 1)}, Subject: "s-alice", Max: 20})
			})
		}
		wg.Wait()
		winner := -1
		for i, err := range errs {
			switch {
			case err == nil && winner >= 0:
				t.Fatalf("reserved=%t: sign-ins %d and %d both enrolled alice@laptop", reserved, winner, i)
			case err == nil:
				winner = i
			case !errors.Is(err, users.ErrDeviceExists):
				t.Fatalf("reserved=%t: sign-in %d: %v; want ErrDeviceExists", reserved, i, err)
			}
		}
		if winner < 0 {
			t.Fatalf("reserved=%t: no sign-in enrolled alice@laptop", reserved)
		}
		if err := b.Reload(context.Background()); err != nil {
			t.Fatal(err)
		}
		d, err := b.Device("alice@laptop")
		if err != nil || !bytes.Equal(d.PublicKey, []byte{byte(winner + 1)}) || d.SSOSubject != "s-alice" {
			t.Fatalf("reserved=%t: alice@laptop in the database: %+v, %v; want the key of sign-in %d, bound to s-alice", reserved, d, err, winner)
		}
	}
}

// The bound on a user's devices enrolled by sign-in holds across instances:
// the bad input is eight sign-ins for eight new names of one user on two
// instances at once, with room for three. Revoked devices (in the store, or
// on the deny list) do not count; a revoked name is ErrDeviceRevoked.
func TestEnrollSignInBoundAcrossInstances(t *testing.T) {
	t.Parallel()
	a, b := twoInstances(t)
	var mu sync.Mutex
	denied := map[string]bool{}
	in := func(device string) users.SignIn {
		return users.SignIn{User: "alice", Device: device, PublicKey: []byte(device), Subject: "s-alice", Max: 3,
			Revoked: func(id string) bool { mu.Lock(); defer mu.Unlock(); return denied[id] }}
	}
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i, name := range []string{"d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"} {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() { _, errs[i] = s.EnrollSignIn(in(name)) })
	}
	wg.Wait()
	var ok, over int
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, users.ErrTooManyDevices):
			over++
		default:
			t.Fatalf("sign-in %d: %v", i, err)
		}
	}
	if ok != 3 || over != 5 {
		t.Fatalf("8 sign-ins at once with room for 3: %d enrolled, %d refused; want 3 and 5", ok, over)
	}
	if err := a.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	var enrolled []string
	for _, u := range a.Users() {
		for _, d := range u.Devices {
			enrolled = append(enrolled, d.ID)
		}
	}
	if len(enrolled) != 3 {
		t.Fatalf("devices in the database: %v; want 3", enrolled)
	}
	if _, err := a.EnrollSignIn(in("extra")); !errors.Is(err, users.ErrTooManyDevices) {
		t.Fatalf("one more: %v; want ErrTooManyDevices", err)
	}
	mu.Lock()
	denied[enrolled[0]] = true
	mu.Unlock()
	if _, err := b.EnrollSignIn(in("extra")); err != nil {
		t.Fatalf("one more once a device is on the deny list: %v", err)
	}
	if err := a.RevokeDevice(enrolled[1]); err != nil {
		t.Fatal(err)
	}
	if _, err := b.EnrollSignIn(in("extra2")); err != nil {
		t.Fatalf("one more once a device is revoked: %v", err)
	}
	_, name, _ := strings.Cut(enrolled[1], "@")
	if _, err := a.EnrollSignIn(in(name)); !errors.Is(err, users.ErrDeviceRevoked) {
		t.Fatalf("a sign-in for the revoked %s: %v; want ErrDeviceRevoked", enrolled[1], err)
	}
}

// An administrator unbinds a user on one instance: another account may
// then bind it on the other; the bad input (a user that does not exist) is
// ErrNotFound.
func TestUnbindUserAcrossInstances(t *testing.T) {
	t.Parallel()
	a, b := twoInstances(t)
	if err := a.BindUser("alice", "s-old"); err != nil {
		t.Fatal(err)
	}
	if err := b.BindUser("alice", "s-new"); !errors.Is(err, users.ErrOtherAccount) {
		t.Fatalf("another account before the unbind: %v; want ErrOtherAccount", err)
	}
	if was, err := b.UnbindUser("alice"); err != nil || was != "s-old" {
		t.Fatalf("unbind: %q, %v; want it to say s-old was cleared", was, err)
	}
	if was, err := a.UnbindUser("alice"); err != nil || was != "" {
		t.Fatalf("unbind again: %q, %v; want nothing cleared", was, err)
	}
	if err := a.BindUser("alice", "s-new"); err != nil {
		t.Fatalf("another account after the unbind: %v", err)
	}
	if _, err := a.UnbindUser("nobody"); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("unbinding a user that does not exist: %v; want ErrNotFound", err)
	}
}

// The bad input: sign-ins and tpd enroll for one user at the same moment on
// two instances, each replacing the user's groups. Every one goes through:
// the sign-in's lock on the user's row must not wait on the key-share lock
// that adding a group takes while the enrolment waits on it, nor two
// replacements of the groups on each other's rows (deadlocks, which
// PostgreSQL ends by failing one as "the database did not answer"). The
// enrolments come one after another: several at once deadlock among
// themselves, an older matter of Enroll's own locks.
func TestEnrollSignInBesideEnroll(t *testing.T) {
	t.Parallel()
	a, b := twoInstances(t)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 16 {
		wg.Go(func() {
			_, err := a.EnrollSignIn(users.SignIn{User: "alice", Device: fmt.Sprintf("s%d", i), PublicKey: []byte{1}, Subject: "s-alice",
				Groups: []string{"ops", fmt.Sprintf("g%d", i)}, Max: 100})
			if err != nil {
				errs <- fmt.Errorf("sign-in %d: %w", i, err)
			}
		})
	}
	wg.Go(func() {
		for i := range 16 {
			if _, err := b.Enroll("alice", fmt.Sprintf("t%d", i), []string{"dev", fmt.Sprintf("h%d", i)}, time.Hour); err != nil {
				errs <- fmt.Errorf("enroll %d: %w", i, err)
			}
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// The groups are one writer's list, not several mixed.
	if err := a.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, u := range a.Users() {
		g := u.Groups
		enrolled := len(g) == 2 && g[0] == "dev" && strings.HasPrefix(g[1], "h")
		signedIn := len(g) == 2 && strings.HasPrefix(g[0], "g") && g[1] == "ops"
		if !enrolled && !signedIn {
			t.Fatalf("alice's groups after the replacements: %v; want one list (dev and hN, or gN and ops)", g)
		}
	}
}
