package users

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
)

func TestEnrollRedeemPersist(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users.json")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	enr, err := s.Enroll("alice", "laptop", []string{"ops", "dev", "ops"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Lookup("alice@laptop"); !errors.Is(err, authz.ErrUnknownDevice) {
		t.Fatalf("a device without a key must not connect: %v", err)
	}
	if _, err := s.Redeem(enr.Token, []byte("key")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Redeem(enr.Token, []byte("key2")); !errors.Is(err, ErrBadToken) {
		t.Fatalf("second redemption of one token: %v", err)
	}
	// A fresh Store on the same file sees the same state: it was saved.
	s2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	groups, err := s2.Lookup("alice@laptop")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(groups, ",") != "dev,ops" {
		t.Errorf("groups %v, want sorted and de-duplicated dev,ops", groups)
	}
	if err := s2.RevokeDevice("alice@laptop"); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Lookup("alice@laptop"); !errors.Is(err, authz.ErrRevoked) {
		t.Fatalf("revoked device: %v", err)
	}
	// Enrolling again and redeeming un-revokes with the new key.
	enr, _ = s2.Enroll("alice", "laptop", nil, time.Hour)
	if _, err := s2.Redeem(enr.Token, []byte("key3")); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Lookup("alice@laptop"); err != nil {
		t.Fatalf("re-enrolled device: %v", err)
	}
	// Omitting groups keeps them.
	if g, _ := s2.Lookup("alice@laptop"); len(g) != 2 {
		t.Errorf("groups after re-enrollment without --groups: %v", g)
	}
}

func TestTokenExpiry(t *testing.T) {
	var skew atomic.Int64
	s, err := Open(filepath.Join(t.TempDir(), "users.json"), WithClock(func() time.Time {
		return time.Now().Add(time.Duration(skew.Load()))
	}))
	if err != nil {
		t.Fatal(err)
	}
	enr, err := s.Enroll("bob", "phone", nil, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	skew.Store(int64(2 * time.Minute))
	if _, err := s.Redeem(enr.Token, []byte("k")); !errors.Is(err, ErrBadToken) {
		t.Fatalf("expired token redeemed: %v", err)
	}
}

// Names that could confuse identities or paths are refused, with the rule in the error.
func TestEnrollRejectsBadInput(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "users.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ user, device string }{
		{"Alice", "laptop"}, {"alice@x", "laptop"}, {"alice", "lap top"}, {"", "laptop"},
		{"alice", strings.Repeat("a", 64)}, {"../etc", "x"},
	} {
		if _, err := s.Enroll(c.user, c.device, nil, time.Hour); !errors.Is(err, ErrBadName) {
			t.Errorf("Enroll(%q, %q): %v", c.user, c.device, err)
		}
	}
	if _, err := s.Enroll("alice", "laptop", []string{"bad group"}, time.Hour); !errors.Is(err, ErrBadName) {
		t.Errorf("bad group accepted: %v", err)
	}
	if _, err := s.Enroll("alice", "laptop", nil, 0); err == nil {
		t.Error("zero token lifetime accepted")
	}
	// The name approvals on the website are made as is no device's.
	if _, err := s.Enroll("alice", SignInDevice, nil, time.Hour); err == nil || !strings.Contains(err.Error(), "give the device another name") {
		t.Errorf("a device named %s: %v; want it refused", SignInDevice, err)
	}
	if _, err := s.Redeem("", nil); !errors.Is(err, ErrBadToken) {
		t.Errorf("empty token: %v", err)
	}
}

func TestOpenCorruptFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users.json")
	if err := writeFile(path, "{not json"); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "backup") {
		t.Fatalf("corrupt store: %v", err)
	}
}

func writeFile(path, s string) error { return os.WriteFile(path, []byte(s), 0o600) }

// Revoking drops pending tokens: a token handed out earlier cannot enroll the
// revoked identity again.
func TestDropTokens(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "users.json"))
	if err != nil {
		t.Fatal(err)
	}
	laptop, _ := s.Enroll("alice", "laptop", nil, time.Hour)
	phone, _ := s.Enroll("alice", "phone", nil, time.Hour)
	bob, _ := s.Enroll("bob", "pc", nil, time.Hour)
	if n, err := s.DropTokens("alice", "laptop"); err != nil || n != 1 {
		t.Fatalf("DropTokens(alice, laptop) = %d, %v", n, err)
	}
	if _, err := s.Redeem(laptop.Token, []byte("k")); !errors.Is(err, ErrBadToken) {
		t.Fatalf("dropped token still redeems: %v", err)
	}
	if n, _ := s.DropTokens("alice", ""); n != 1 {
		t.Fatalf("dropping all of alice's tokens dropped %d", n)
	}
	if _, err := s.Redeem(phone.Token, []byte("k")); !errors.Is(err, ErrBadToken) {
		t.Fatalf("dropped token still redeems: %v", err)
	}
	if _, err := s.Redeem(bob.Token, []byte("k")); err != nil {
		t.Fatalf("another user's token was dropped: %v", err)
	}
}

// A device's scope is saved, survives a reload and a new token for the
// device (enrolling again never widens it). Bad input: a scope TP does not
// know, and a device that does not exist.
func TestScopePersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users.json")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	enr, err := s.Enroll("alice", "ci", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetScope(enr.DeviceID, "expose:ci"); err != nil {
		t.Fatal(err)
	}
	if err := s.SetScope(enr.DeviceID, "admin:all"); err == nil || !strings.Contains(err.Error(), "want expose:LABEL") {
		t.Fatalf("an unknown scope: %v", err)
	}
	if err := s.SetScope("alice@nothing", "expose:ci"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a scope for a device that does not exist: %v; want ErrNotFound", err)
	}
	if _, err := s.Redeem(enr.Token, []byte("key")); err != nil {
		t.Fatal(err)
	}
	again, err := s.Enroll("alice", "ci", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Redeem(again.Token, []byte("key2")); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := s2.Scope("alice@ci"); got != "expose:ci" {
		t.Fatalf("scope after a new key and a reload: %q; want expose:ci", got)
	}
	if got := s2.Scope("alice@nothing"); got != "" {
		t.Fatalf("scope of an unknown device: %q", got)
	}
}

// A grant is created once under the store's lock, however many approvals of
// the key arrive at once; the bound counts scoped devices not revoked. Bad
// input: 8 approvals of one key at once, another key under the name, a
// grant past the bound, a user that does not exist, a grant without a scope.
func TestEnrollGrant(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "users.json"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Enroll("alice", "laptop", nil, time.Hour); err != nil {
		t.Fatal(err)
	}
	g := Grant{User: "alice", By: "alice@laptop", Device: "grant-aaaa", PublicKey: []byte("app key"), Scope: "expose:ci", Max: 2}
	errs := make(chan error, 8)
	for range 8 {
		go func() { _, err := s.EnrollGrant(g); errs <- err }()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Errorf("an approval beside 7 others: %v", err)
		}
	}
	if d, ok := s.DeviceByKey([]byte("app key")); !ok || d.ID != "alice@grant-aaaa" || d.Scope != "expose:ci" {
		t.Fatalf("DeviceByKey: %+v, %v", d, ok)
	}
	other := g
	other.PublicKey = []byte("another key")
	if _, err := s.EnrollGrant(other); !errors.Is(err, ErrDeviceExists) {
		t.Fatalf("another key under the name: %v; want ErrDeviceExists", err)
	}
	if _, err := s.EnrollGrant(Grant{User: "alice", By: "alice@laptop", Device: "grant-bbbb", PublicKey: []byte("k2"), Scope: "expose:ci", Max: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnrollGrant(Grant{User: "alice", By: "alice@laptop", Device: "grant-cccc", PublicKey: []byte("k3"), Scope: "expose:ci", Max: 2}); !errors.Is(err, ErrTooManyDevices) {
		t.Fatalf("a third grant with room for two: %v; want ErrTooManyDevices", err)
	}
	if err := s.RevokeDevice("alice@grant-bbbb"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnrollGrant(Grant{User: "alice", By: "alice@laptop", Device: "grant-cccc", PublicKey: []byte("k3"), Scope: "expose:ci", Max: 2}); err != nil {
		t.Fatalf("a grant once a revoked one freed its room: %v", err)
	}
	if _, err := s.EnrollGrant(Grant{User: "nobody", By: "nobody@laptop", Device: "grant-dddd", PublicKey: []byte("k4"), Scope: "expose:ci", Max: 2}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a grant for a user that does not exist: %v; want ErrNotFound", err)
	}
	if _, err := s.EnrollGrant(Grant{User: "alice", By: "alice@laptop", Device: "grant-eeee", PublicKey: []byte("k5"), Max: 2}); err == nil {
		t.Fatal("a grant without a scope was made")
	}
	if _, err := s.EnrollGrant(Grant{User: "alice", By: "bob@laptop", Device: "grant-eeee", PublicKey: []byte("k5"), Scope: "expose:ci", Max: 9}); err == nil {
		t.Fatal("a grant approved by another user's device was made")
	}

	// A grant is revoked with its approver: Lookup refuses it, saying so, and
	// GrantedBy names the approver for the deny list's check.
	if by := s.GrantedBy("alice@grant-aaaa"); by != "alice@laptop" {
		t.Fatalf("GrantedBy = %q, want alice@laptop", by)
	}
	if _, err := s.Lookup("alice@grant-aaaa"); err != nil {
		t.Fatalf("a grant whose approver is live: %v", err)
	}
	if err := s.RevokeDevice("alice@laptop"); err != nil {
		t.Fatal(err)
	}
	_, err = s.Lookup("alice@grant-aaaa")
	if !errors.Is(err, authz.ErrRevoked) || !strings.Contains(err.Error(), "granted by alice@laptop, which has been revoked") {
		t.Fatalf("a grant whose approver was revoked: %v; want ErrRevoked naming the approver", err)
	}
}

// DeviceByKey answers from an index that follows every change: a device
// enrolled again with a new key is found by the new key only. Bad input: the
// old key, asked after the change; a key no device holds.
func TestDeviceByKeyFollowsChanges(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "users.json"))
	if err != nil {
		t.Fatal(err)
	}
	enrol := func(key string) { enrolKey(t, s, "alice", "laptop", key) }
	enrol("first key")
	if d, ok := s.DeviceByKey([]byte("first key")); !ok || d.ID != "alice@laptop" {
		t.Fatalf("DeviceByKey(first key) = %+v, %v", d, ok)
	}
	enrol("second key")
	if d, ok := s.DeviceByKey([]byte("first key")); ok {
		t.Fatalf("the replaced key still finds %s", d.ID)
	}
	if d, ok := s.DeviceByKey([]byte("second key")); !ok || d.ID != "alice@laptop" || string(d.PublicKey) != "second key" {
		t.Fatalf("DeviceByKey(second key) = %+v, %v", d, ok)
	}
	if _, ok := s.DeviceByKey([]byte("nobody's key")); ok {
		t.Fatal("a key no device holds found one")
	}
}

// BenchmarkDeviceByKeyMiss is an application's poll for a grant not yet
// approved, among 100,000 devices.
func BenchmarkDeviceByKeyMiss(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "users.json"))
	if err != nil {
		b.Fatal(err)
	}
	s.mu.Lock()
	s.st.Users["alice"] = &User{Name: "alice"}
	for i := range 100_000 {
		id := fmt.Sprintf("alice@d%d", i)
		s.st.Devices[id] = &Device{ID: id, User: "alice", Name: fmt.Sprintf("d%d", i), PublicKey: fmt.Appendf(nil, "key %d", i)}
	}
	s.gen++
	s.mu.Unlock()
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := s.DeviceByKey([]byte("a key not granted yet")); ok {
			b.Fatal("found")
		}
	}
}

// A grant does not come back with its approver's name: a device enrolled
// again under the approver's name with another key (a replacement for a
// stolen laptop) or the same account bound again after an unbind finds the
// grants ended for good. Bad input: re-enrolling the approver with a new
// key; unbinding then binding the same account; the same key again, which
// is the same machine and keeps its grants.
func TestGrantsEndForGood(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "users.json"))
	if err != nil {
		t.Fatal(err)
	}
	enrol := func(key string) { enrolKey(t, s, "alice", "laptop", key) }
	enrol("laptop key")
	grant := func(dev, by, key string) string {
		t.Helper()
		g, err := s.EnrollGrant(Grant{User: "alice", Device: dev, By: by, PublicKey: []byte(key), Scope: "expose:ci", Max: 9})
		if err != nil {
			t.Fatal(err)
		}
		return g.ID
	}
	byLaptop := grant("grant-aaaa", "alice@laptop", "app a")
	enrol("laptop key") // the same machine again
	if _, err := s.Lookup(byLaptop); err != nil {
		t.Fatalf("the grant after its approver enrolled again with the same key: %v", err)
	}
	enrol("the thief's replacement key")
	if d, _ := s.Device(byLaptop); !d.Revoked {
		t.Fatal("the grant lives on after its approver's name got another key")
	}

	if err := s.BindUser("alice", "s-alice"); err != nil {
		t.Fatal(err)
	}
	bySignIn := grant("grant-bbbb", SignInApprover+"s-alice", "app b")
	if _, err := s.Lookup(bySignIn); err != nil {
		t.Fatalf("a grant approved by a sign-in of the bound account: %v", err)
	}
	if _, err := s.UnbindUser("alice"); err != nil {
		t.Fatal(err)
	}
	if err := s.BindUser("alice", "s-alice"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Lookup(bySignIn); !errors.Is(err, authz.ErrRevoked) {
		t.Fatalf("the grant after its account was unbound and bound again: %v; want it ended for good", err)
	}
}

// The same approval again, once the grant ended with its approver's
// revocation on the deny list (the store knows nothing of it) or in the
// store, is refused as revoked rather than answered with the dead grant.
func TestSameGrantAfterItsApprover(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "users.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, dev := range []string{"laptop", "phone"} {
		if _, err := s.Enroll("alice", dev, nil, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	g := Grant{User: "alice", Device: "grant-aaaa", By: "alice@phone", PublicKey: []byte("app"), Scope: "expose:ci", Max: 9}
	if _, err := s.EnrollGrant(g); err != nil {
		t.Fatal(err)
	}
	if err := s.RevokeDevice("alice@phone"); err != nil {
		t.Fatal(err)
	}
	g.By = "alice@laptop"
	if _, err := s.EnrollGrant(g); !errors.Is(err, ErrDeviceRevoked) {
		t.Fatalf("approving again a grant that ended with its approver: %v; want ErrDeviceRevoked", err)
	}
}

// enrolKey enrols user@device with key, by a token as tpd enroll and dlogin do.
func enrolKey(t *testing.T, s *File, user, device, key string) {
	t.Helper()
	e, err := s.Enroll(user, device, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Redeem(e.Token, []byte(key)); err != nil {
		t.Fatal(err)
	}
}
