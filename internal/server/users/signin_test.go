package users

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// The bad input: sixteen sign-ins for one new name at the same moment, each
// with its own key, against a name that does not exist and against one
// reserved by a token never redeemed. Exactly one enrols; the others are
// ErrDeviceExists and did not replace its key, on disk too.
func TestEnrollSignInRace(t *testing.T) {
	for _, reserved := range []bool{false, true} {
		t.Run(fmt.Sprintf("reserved=%t", reserved), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "users.json")
			s, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			if reserved {
				if _, err := s.Enroll("alice", "laptop", nil, time.Hour); err != nil {
					t.Fatal(err)
				}
			}
			const n = 16
			var wg sync.WaitGroup
			errs := make([]error, n)
			for i := range n {
				wg.Go(func() {
					_, errs[i] = s.EnrollSignIn(SignIn{User: "alice", Device: "laptop", PublicKey: []byte{byte(i)}, Subject: "s-alice", Max: 20})
				})
			}
			wg.Wait()
			winner := -1
			for i, err := range errs {
				switch {
				case err == nil && winner >= 0:
					t.Fatalf("sign-ins %d and %d both enrolled alice@laptop", winner, i)
				case err == nil:
					winner = i
				case !errors.Is(err, ErrDeviceExists):
					t.Fatalf("sign-in %d: %v; want ErrDeviceExists", i, err)
				}
			}
			if winner < 0 {
				t.Fatal("no sign-in enrolled alice@laptop")
			}
			again, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			d, err := again.Device("alice@laptop")
			if err != nil || !bytes.Equal(d.PublicKey, []byte{byte(winner)}) || d.SSOSubject != "s-alice" {
				t.Fatalf("alice@laptop on disk: %+v, %v; want the key of sign-in %d, bound to s-alice", d, err, winner)
			}
		})
	}
}

// A user's devices enrolled by sign-in are bounded; the bad input is one
// more. Revoked ones (in the store, or on tpd's deny list) and ones the
// administrator enrolled with a token do not count. A revoked name is
// ErrDeviceRevoked.
func TestEnrollSignInBound(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "users.json"))
	if err != nil {
		t.Fatal(err)
	}
	denied := map[string]bool{}
	in := func(device string) SignIn {
		return SignIn{User: "alice", Device: device, PublicKey: []byte(device), Subject: "s-alice", Max: 2,
			Revoked: func(id string) bool { return denied[id] }}
	}
	en, err := s.Enroll("alice", "desk", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Redeem(en.Token, []byte("desk")); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"one", "two"} {
		if _, err := s.EnrollSignIn(in(d)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.EnrollSignIn(in("three")); !errors.Is(err, ErrTooManyDevices) {
		t.Fatalf("a third device by sign-in with a bound of 2: %v; want ErrTooManyDevices", err)
	}
	if _, err := s.Device("alice@three"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("alice@three after the refusal: %v; want it absent", err)
	}
	denied["alice@one"] = true
	if _, err := s.EnrollSignIn(in("three")); err != nil {
		t.Fatalf("a third device once one is on the deny list: %v", err)
	}
	if err := s.RevokeDevice("alice@two"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnrollSignIn(in("four")); err != nil {
		t.Fatalf("a fourth device once another is revoked: %v", err)
	}
	if _, err := s.EnrollSignIn(in("two")); !errors.Is(err, ErrDeviceRevoked) {
		t.Fatalf("a sign-in for the revoked alice@two: %v; want ErrDeviceRevoked", err)
	}
	bad := in("five")
	bad.Max = 0
	if _, err := s.EnrollSignIn(bad); err == nil {
		t.Fatal("a bound of 0 devices was taken as no bound")
	}
}

// An administrator unbinds a user from the provider's account it was bound
// to: the change is reported, another account may then bind it, and the
// bad input (a user that does not exist) is ErrNotFound.
func TestUnbindUser(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users.json")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.BindUser("alice", "s-old"); err != nil {
		t.Fatal(err)
	}
	if err := s.BindUser("alice", "s-new"); !errors.Is(err, ErrOtherAccount) {
		t.Fatalf("another account before the unbind: %v; want ErrOtherAccount", err)
	}
	if was, err := s.UnbindUser("alice"); err != nil || was != "s-old" {
		t.Fatalf("unbind: %q, %v; want it to say s-old was cleared", was, err)
	}
	if was, err := s.UnbindUser("alice"); err != nil || was != "" {
		t.Fatalf("unbind again: %q, %v; want nothing cleared", was, err)
	}
	if err := s.BindUser("alice", "s-new"); err != nil {
		t.Fatalf("another account after the unbind: %v", err)
	}
	if _, err := s.UnbindUser("nobody"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unbinding a user that does not exist: %v; want ErrNotFound", err)
	}
	again, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if u := again.Users(); len(u) != 1 || u[0].SSOSubject != "s-new" {
		t.Fatalf("on disk: %+v; want alice bound to s-new", u)
	}
}
