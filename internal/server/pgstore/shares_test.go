package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// twoInstancesDB is twoInstances with the first one's database, for a test
// that changes rows as time would.
func twoInstancesDB(t *testing.T) (a, b *pgstore.Users, db *pgstore.DB) {
	t.Helper()
	_, dsn := testpg.NewDatabase(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	db = open(t, dsn)
	var err error
	if a, err = pgstore.OpenUsers(ctx, db); err != nil {
		t.Fatal(err)
	}
	if b, err = pgstore.OpenUsers(ctx, open(t, dsn)); err != nil {
		t.Fatal(err)
	}
	return a, b, db
}

// withApprover enrols alice@laptop by sign-in (subject s-alice) on s, the
// device that approves alice's shares.
func withApprover(t *testing.T, s *pgstore.Users) {
	t.Helper()
	if _, err := s.EnrollSignIn(users.SignIn{User: "alice", Device: "laptop", PublicKey: []byte("alice-laptop"), Subject: "s-alice", Max: 5}); err != nil {
		t.Fatal(err)
	}
}

// share is a share of web by alice@laptop with guest for an hour from now.
func share(guest string) users.Share {
	now := time.Now().UTC().Truncate(time.Microsecond)
	return users.Share{ID: users.NewShareID(), Name: "web", Guest: guest, User: "alice", By: "alice@laptop", Created: now, Until: now.Add(time.Hour)}
}

// guest is the sign-in of one of bob@example.com's devices by share id.
func guest(device, id string) users.SignIn {
	return users.SignIn{User: users.GuestUser("bob@example.com"), Device: device, PublicKey: []byte("bob-" + device), Subject: "s-bob", Max: 100, Share: id}
}

func reload(t *testing.T, ss ...*pgstore.Users) {
	t.Helper()
	for _, s := range ss {
		if err := s.Reload(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
}

// A share added on one instance is seen and taken on the other: the guest's
// device has the share's scope and is granted by it. The bad input is the
// guest's device used after the share was revoked on the first instance
// (Lookup on the second refuses it), a new guest's sign-in by the revoked
// share (ErrShareEnded), and the revocation of a share that does not exist
// (ErrNotFound).
func TestShareAcrossInstances(t *testing.T) {
	t.Parallel()
	a, b := twoInstances(t)
	withApprover(t, a)
	sh := share("bob@example.com")
	if err := a.AddShare(sh, 0); err != nil {
		t.Fatal(err)
	}
	reload(t, b)
	got := b.Shares()
	if len(got) != 1 || got[0].ID != sh.ID || got[0].Name != "web" || got[0].Guest != sh.Guest || got[0].User != "alice" || got[0].By != "alice@laptop" ||
		!got[0].Created.Equal(sh.Created) || !got[0].Until.Equal(sh.Until) || got[0].Revoked {
		t.Fatalf("shares on the other instance: %+v; want %+v", got, sh)
	}
	d, err := b.EnrollSignIn(guest("phone", sh.ID))
	if err != nil {
		t.Fatalf("a guest's sign-in by the share: %v", err)
	}
	if d.Scope != "guest:web" || d.GrantedBy != users.ShareApprover+sh.ID || d.User != users.GuestUser("bob@example.com") {
		t.Fatalf("the guest's device: %+v; want scope guest:web granted by %s%s", d, users.ShareApprover, sh.ID)
	}
	reload(t, a)
	for name, s := range map[string]*pgstore.Users{"a": a, "b": b} {
		if _, err := s.Lookup(d.ID); err != nil {
			t.Fatalf("instance %s: Lookup of the guest's device: %v", name, err)
		}
		if sc := s.Scope(d.ID); sc != "guest:web" {
			t.Fatalf("instance %s: the guest's device's scope: %q; want guest:web", name, sc)
		}
	}
	r, err := a.RevokeShare(sh.ID)
	if err != nil || !r.Revoked || r.RevokedAt.IsZero() {
		t.Fatalf("RevokeShare: %+v, %v; want it revoked, with its time", r, err)
	}
	if again, err := b.RevokeShare(sh.ID); err != nil || !again.Revoked || !again.RevokedAt.Equal(r.RevokedAt) {
		t.Fatalf("RevokeShare again on the other instance: %+v, %v; want it as the first revocation left it", again, err)
	}
	reload(t, b)
	if _, err := b.Lookup(d.ID); !errors.Is(err, authz.ErrRevoked) {
		t.Fatalf("Lookup of the guest's device after the share was revoked: %v; want ErrRevoked", err)
	}
	if got := b.Shares(); len(got) != 1 || !got[0].Revoked {
		t.Fatalf("shares after the revocation: %+v; want the one, revoked", got)
	}
	if _, err := b.EnrollSignIn(guest("tablet", sh.ID)); !errors.Is(err, users.ErrShareEnded) {
		t.Fatalf("a guest's sign-in by the revoked share: %v; want ErrShareEnded", err)
	}
	if _, err := a.RevokeShare(users.NewShareID()); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("revoking a share that does not exist: %v; want ErrNotFound", err)
	}
}

// The bad input: a guest's sign-in by a share past its Until, by one that
// does not exist, and a guest's device used once its share has run out (the
// database's row moved into the past, as time would). Each is refused: the
// sign-ins with ErrShareEnded, changing nothing, the device by Lookup.
func TestShareEnded(t *testing.T) {
	t.Parallel()
	a, b, db := twoInstancesDB(t)
	withApprover(t, a)
	past := share("bob@example.com")
	past.Created, past.Until = past.Created.Add(-2*time.Hour), past.Created.Add(-time.Hour)
	if err := a.AddShare(past, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := b.EnrollSignIn(guest("phone", past.ID)); !errors.Is(err, users.ErrShareEnded) {
		t.Fatalf("a guest's sign-in by a share past its end: %v; want ErrShareEnded", err)
	}
	if _, err := b.EnrollSignIn(guest("phone", users.NewShareID())); !errors.Is(err, users.ErrShareEnded) {
		t.Fatalf("a guest's sign-in by a share that does not exist: %v; want ErrShareEnded", err)
	}
	reload(t, b)
	if _, err := b.Device(users.GuestUser("bob@example.com") + "@phone"); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("the refused guest's device: %v; want none", err)
	}
	live := share("bob@example.com")
	if err := a.AddShare(live, 0); err != nil {
		t.Fatal(err)
	}
	d, err := b.EnrollSignIn(guest("phone", live.ID))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool().Exec(context.Background(), "UPDATE tp_shares SET until = now() - interval '1 second' WHERE id = $1", live.ID); err != nil {
		t.Fatal(err)
	}
	reload(t, a, b)
	for name, s := range map[string]*pgstore.Users{"a": a, "b": b} {
		if _, err := s.Lookup(d.ID); !errors.Is(err, authz.ErrRevoked) {
			t.Fatalf("instance %s: Lookup of a guest's device whose share ran out: %v; want ErrRevoked", name, err)
		}
	}
}

// A share lives as long as its approver. The bad input: a guest's device
// used, and a new guest's sign-in, after the approving device was revoked,
// after it was enrolled again with another key, after the approving
// sign-in's user was unbound from that account, and by a share whose
// sign-in approver was never the user's account. The share is revoked with
// its approver (or never takes a guest), Lookup refuses the device with
// ErrRevoked, and the sign-in is ErrShareEnded.
func TestShareEndsWithApprover(t *testing.T) {
	t.Parallel()
	ended := func(t *testing.T, a, b *pgstore.Users, sh users.Share, guestID, why string) {
		t.Helper()
		reload(t, a, b)
		if got := b.Shares(); len(got) != 1 || got[0].ID != sh.ID || !got[0].Revoked || got[0].RevokedAt.IsZero() {
			t.Fatalf("%s: the shares: %+v; want %s revoked, with its time", why, got, sh.ID)
		}
		if guestID != "" {
			if _, err := b.Lookup(guestID); !errors.Is(err, authz.ErrRevoked) {
				t.Fatalf("%s: Lookup of the guest's device: %v; want ErrRevoked", why, err)
			}
		}
		if _, err := b.EnrollSignIn(guest("another", sh.ID)); !errors.Is(err, users.ErrShareEnded) {
			t.Fatalf("%s: a guest's sign-in: %v; want ErrShareEnded", why, err)
		}
	}

	t.Run("RevokeDevice", func(t *testing.T) {
		t.Parallel()
		a, b := twoInstances(t)
		withApprover(t, a)
		sh := share("@example.com")
		if err := a.AddShare(sh, 0); err != nil {
			t.Fatal(err)
		}
		d, err := b.EnrollSignIn(guest("phone", sh.ID))
		if err != nil {
			t.Fatal(err)
		}
		if err := a.RevokeDevice("alice@laptop"); err != nil {
			t.Fatal(err)
		}
		ended(t, a, b, sh, d.ID, "the approving device revoked")
	})

	t.Run("Redeem", func(t *testing.T) {
		t.Parallel()
		a, b := twoInstances(t)
		enroll := func(key string) {
			e, err := a.Enroll("alice", "laptop", nil, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := b.Redeem(e.Token, []byte(key)); err != nil {
				t.Fatal(err)
			}
		}
		enroll("key-1")
		sh := share("bob@example.com")
		if err := a.AddShare(sh, 0); err != nil {
			t.Fatal(err)
		}
		d, err := b.EnrollSignIn(guest("phone", sh.ID))
		if err != nil {
			t.Fatal(err)
		}
		enroll("key-1") // the same key again ends nothing
		reload(t, b)
		if _, err := b.Lookup(d.ID); err != nil {
			t.Fatalf("Lookup of the guest's device after its approver redeemed the same key: %v", err)
		}
		enroll("key-2")
		ended(t, a, b, sh, d.ID, "the approving device enrolled again with another key")
	})

	t.Run("UnbindUser", func(t *testing.T) {
		t.Parallel()
		a, b := twoInstances(t)
		if err := a.BindUser("alice", "s-alice"); err != nil {
			t.Fatal(err)
		}
		sh := share("bob@example.com")
		sh.By = users.SignInApprover + "s-alice"
		if err := a.AddShare(sh, 0); err != nil {
			t.Fatal(err)
		}
		d, err := b.EnrollSignIn(guest("phone", sh.ID))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.UnbindUser("alice"); err != nil {
			t.Fatal(err)
		}
		ended(t, a, b, sh, d.ID, "the approving sign-in's user unbound")
	})

	t.Run("OtherAccount", func(t *testing.T) {
		t.Parallel()
		a, b := twoInstances(t)
		if err := a.BindUser("alice", "s-alice"); err != nil {
			t.Fatal(err)
		}
		sh := share("bob@example.com")
		sh.By = users.SignInApprover + "s-someone-else"
		if err := a.AddShare(sh, 0); err != nil {
			t.Fatal(err)
		}
		reload(t, b)
		if _, err := b.EnrollSignIn(guest("phone", sh.ID)); !errors.Is(err, users.ErrShareEnded) {
			t.Fatalf("a guest's sign-in by a share whose sign-in approver is not alice's account: %v; want ErrShareEnded", err)
		}
	})
}

// The bad input: more shares of one user that have not ended than the
// bound, added on two instances at once (ErrTooManyShares, exactly the
// excess), a share of a user that does not exist (ErrNotFound), one whose
// ID is taken, and one CheckShare refuses. Revoked shares do not count;
// another user's bound is their own; a share that ended more than
// users.ShareKeep ago is forgotten by the next addition.
func TestShareBound(t *testing.T) {
	t.Parallel()
	a, b := twoInstances(t)
	withApprover(t, a)
	if _, err := a.EnrollSignIn(users.SignIn{User: "carol", Device: "laptop", PublicKey: []byte("carol-laptop"), Subject: "s-carol", Max: 5}); err != nil {
		t.Fatal(err)
	}
	const max = 3
	var wg sync.WaitGroup
	errs := make([]error, 8)
	ids := make([]string, 8)
	for i := range errs {
		s := a
		if i%2 == 1 {
			s = b
		}
		sh := share(fmt.Sprintf("guest%d@example.com", i))
		ids[i] = sh.ID
		wg.Go(func() { errs[i] = s.AddShare(sh, max) })
	}
	wg.Wait()
	var added []string
	over := 0
	for i, err := range errs {
		switch {
		case err == nil:
			added = append(added, ids[i])
		case errors.Is(err, users.ErrTooManyShares):
			over++
		default:
			t.Fatalf("share %d: %v", i, err)
		}
	}
	if len(added) != max || over != 8-max {
		t.Fatalf("8 shares at once with room for %d: %d added, %d refused; want %d and %d", max, len(added), over, max, 8-max)
	}
	reload(t, a, b)
	if got := b.Shares(); len(got) != max {
		t.Fatalf("shares in the database: %d; want %d", len(got), max)
	}
	if err := b.AddShare(share("one.more@example.com"), max); !errors.Is(err, users.ErrTooManyShares) {
		t.Fatalf("one more: %v; want ErrTooManyShares", err)
	}
	carol := share("bob@example.com")
	carol.User, carol.By = "carol", "carol@laptop"
	if err := b.AddShare(carol, max); err != nil {
		t.Fatalf("another user's share: %v", err)
	}
	if _, err := a.RevokeShare(added[0]); err != nil {
		t.Fatal(err)
	}
	if err := b.AddShare(share("one.more@example.com"), max); err != nil {
		t.Fatalf("one more once a share is revoked: %v", err)
	}

	nobody := share("bob@example.com")
	nobody.User, nobody.By = "nobody", "nobody@laptop"
	if err := a.AddShare(nobody, 0); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("a share of a user that does not exist: %v; want ErrNotFound", err)
	}
	dup := share("bob@example.com")
	dup.ID = added[1]
	if err := a.AddShare(dup, 100); err == nil || errors.Is(err, users.ErrUnavailable) {
		t.Fatalf("a share whose ID is taken: %v; want a refusal", err)
	}
	bad := share("Bob@Example.com")
	if err := a.AddShare(bad, 0); err == nil || errors.Is(err, users.ErrUnavailable) {
		t.Fatalf("a share CheckShare refuses: %v; want a refusal", err)
	}

	old := share("old@example.com")
	old.Created, old.Until = old.Created.Add(-users.ShareKeep-2*time.Hour), old.Created.Add(-users.ShareKeep-time.Hour)
	if err := a.AddShare(old, 100); err != nil {
		t.Fatal(err)
	}
	reload(t, b)
	if !hasShare(b.Shares(), old.ID) {
		t.Fatalf("a share that ended long ago, just added: not listed")
	}
	if err := a.AddShare(share("next@example.com"), 100); err != nil {
		t.Fatal(err)
	}
	reload(t, b)
	if hasShare(b.Shares(), old.ID) {
		t.Fatalf("a share that ended more than %s ago: still listed after another addition", users.ShareKeep)
	}
	if !hasShare(b.Shares(), added[0]) {
		t.Fatalf("a share revoked just now: forgotten; want it listed until %s after", users.ShareKeep)
	}
}

func hasShare(ss []users.Share, id string) bool {
	for _, s := range ss {
		if s.ID == id {
			return true
		}
	}
	return false
}

// The bad input: more guests' devices than users.MaxGuestsPerShare signing
// in by one share on two instances at once. Exactly MaxGuestsPerShare
// enrol; the others are ErrShareFull. A revoked guest's device does not
// count.
func TestShareFull(t *testing.T) {
	t.Parallel()
	a, b := twoInstances(t)
	withApprover(t, a)
	sh := share("@example.com")
	if err := a.AddShare(sh, 0); err != nil {
		t.Fatal(err)
	}
	n := users.MaxGuestsPerShare + 6
	var wg sync.WaitGroup
	errs := make([]error, n)
	devs := make([]users.Device, n)
	for i := range n {
		s := a
		if i%2 == 1 {
			s = b
		}
		// Guests of the domain, each with a device of their own name.
		in := users.SignIn{User: fmt.Sprintf("g%d.example.com", i), Device: "phone", PublicKey: []byte(fmt.Sprintf("g%d", i)),
			Subject: fmt.Sprintf("s-g%d", i), Max: 5, Share: sh.ID}
		wg.Go(func() { devs[i], errs[i] = s.EnrollSignIn(in) })
	}
	wg.Wait()
	var enrolled []users.Device
	full := 0
	for i, err := range errs {
		switch {
		case err == nil:
			enrolled = append(enrolled, devs[i])
		case errors.Is(err, users.ErrShareFull):
			full++
		default:
			t.Fatalf("guest %d: %v", i, err)
		}
	}
	if len(enrolled) != users.MaxGuestsPerShare || full != n-users.MaxGuestsPerShare {
		t.Fatalf("%d guests at once with room for %d: %d enrolled, %d refused; want %d and %d",
			n, users.MaxGuestsPerShare, len(enrolled), full, users.MaxGuestsPerShare, n-users.MaxGuestsPerShare)
	}
	if _, err := b.EnrollSignIn(guest("phone", sh.ID)); !errors.Is(err, users.ErrShareFull) {
		t.Fatalf("one more guest: %v; want ErrShareFull", err)
	}
	if err := a.RevokeDevice(enrolled[0].ID); err != nil {
		t.Fatal(err)
	}
	if _, err := b.EnrollSignIn(guest("phone", sh.ID)); err != nil {
		t.Fatalf("one more guest once a guest's device is revoked: %v", err)
	}
}
