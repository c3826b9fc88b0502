package users

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
)

// shareT0 is the tests' start of time: shares are made at it and the clock
// moves on from it.
var shareT0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// shareClock is a store's clock that a test moves forward.
type shareClock struct{ off atomic.Int64 }

func (c *shareClock) now() time.Time          { return shareT0.Add(time.Duration(c.off.Load())) }
func (c *shareClock) advance(d time.Duration) { c.off.Add(int64(d)) }

// openShareStore opens an empty store at a fresh path with a clock at shareT0.
func openShareStore(t *testing.T) (*File, string, *shareClock) {
	t.Helper()
	c := &shareClock{}
	path := filepath.Join(t.TempDir(), "users.json")
	s, err := Open(path, WithClock(c.now))
	if err != nil {
		t.Fatal(err)
	}
	return s, path, c
}

// aliceShare is a share of web by alice@laptop with bob@example.com, for an
// hour from the clock's now.
func aliceShare(now time.Time) Share {
	return Share{ID: NewShareID(), Name: "web", Guest: "bob@example.com", User: "alice", By: "alice@laptop",
		Created: now, Until: now.Add(time.Hour)}
}

// addShare records sh, failing the test if the store refuses it.
func addShare(t *testing.T, s *File, sh Share) Share {
	t.Helper()
	if err := s.AddShare(sh, 0); err != nil {
		t.Fatalf("AddShare(%+v): %v", sh, err)
	}
	return sh
}

// enrolGuest enrols user@device by a guest's sign-in for the share.
func enrolGuest(s *File, user, device, share string) (Device, error) {
	return s.EnrollSignIn(SignIn{User: user, Device: device, PublicKey: []byte(user + "/" + device),
		Subject: "s-" + user, Groups: []string{}, Max: 100, Share: share})
}

// shareByID is the store's listing of the share with that ID.
func shareByID(t *testing.T, s *File, id string) Share {
	t.Helper()
	for _, sh := range s.Shares() {
		if sh.ID == id {
			return sh
		}
	}
	t.Fatalf("share %s is not listed", id)
	return Share{}
}

// Who a share is for, as a person types it. Bad input: no '@', two, spaces,
// control and non-ASCII bytes, a domain without a dot or with an empty
// label, labels that start or end with '-', and addresses past 254 bytes.
func TestParseGuest(t *testing.T) {
	long := strings.Repeat("a", 63)
	dom254 := long + "." + long + "." + long + "." + strings.Repeat("a", 61) // 253 bytes
	for _, c := range []struct {
		in, want string // want "" for a refusal
		why      string // a refusal's reason, in its error
	}{
		{in: "Bob@Example.COM", want: "bob@example.com"},
		{in: "@example.com", want: "@example.com"},
		{in: "@EXAMPLE.com", want: "@example.com"},
		{in: "bob.smith+tp@mail.example.co.uk", want: "bob.smith+tp@mail.example.co.uk"},
		{in: "bob@x-y.example.com", want: "bob@x-y.example.com"},
		{in: "@" + dom254, want: "@" + dom254}, // 254 bytes: the most
		{in: "b@" + dom254, why: "longer than"},
		{in: strings.Repeat("b", 250) + "@example.com", why: "longer than"},
		{in: "bob.example.com", why: "no '@'"},
		{in: "", why: "no '@'"},
		{in: "bob@carol@example.com", why: "more than one '@'"},
		{in: "@@example.com", why: "more than one '@'"},
		{in: "bob smith@example.com", why: "no spaces"},
		{in: " bob@example.com", why: "no spaces"},
		{in: "bob@example.com ", why: "no spaces"},
		{in: "bob\t@example.com", why: "no spaces"},
		{in: "bob\n@example.com", why: "no spaces"},
		{in: "bob\x00@example.com", why: "no spaces"},
		{in: "bob\x7f@example.com", why: "no spaces"},
		{in: "böb@example.com", why: "no spaces"},
		{in: "bob@exämple.com", why: "no spaces"},
		{in: "bob@localhost", why: "not a domain name"},
		{in: "@com", why: "not a domain name"},
		{in: "bob@", why: "not a domain name"},
		{in: "bob@.example.com", why: "not a domain name"},
		{in: "bob@example..com", why: "not a domain name"},
		{in: "bob@example.com.", why: "not a domain name"},
		{in: "bob@-example.com", why: "not a domain name"},
		{in: "bob@example-.com", why: "not a domain name"},
		{in: "bob@example.-com", why: "not a domain name"},
		{in: "bob@example.com-", why: "not a domain name"},
		{in: "bob@exa_mple.com", why: "not a domain name"},
		{in: "bob@" + strings.Repeat("a", 64) + ".com", why: "not a domain name"},
	} {
		got, err := ParseGuest(c.in)
		switch {
		case c.want != "" && (err != nil || got != c.want):
			t.Errorf("ParseGuest(%q) = %q, %v; want %q", c.in, got, err, c.want)
		case c.want == "" && (err == nil || got != ""):
			t.Errorf("ParseGuest(%q) = %q, %v; want it refused (%s)", c.in, got, err, c.why)
		case c.want == "" && !strings.Contains(err.Error(), c.why):
			t.Errorf("ParseGuest(%q): %v; want it refused for %q", c.in, err, c.why)
		}
		if err == nil {
			if again, err := ParseGuest(got); err != nil || again != got {
				t.Errorf("ParseGuest(ParseGuest(%q)) = %q, %v; want it unchanged", c.in, again, err)
			}
		}
	}
}

// NewShareID's IDs are ValidShareID's, and differ. Bad input: IDs of other
// forms: another prefix, upper-case or non-hex digits, one digit too few or
// too many.
func TestShareID(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		id := NewShareID()
		if !ValidShareID(id) {
			t.Fatalf("ValidShareID(NewShareID() = %q) is false", id)
		}
		if seen[id] {
			t.Fatalf("NewShareID gave %q twice", id)
		}
		seen[id] = true
	}
	for _, id := range []string{
		"", "share-", "share-0123456789a", "share-0123456789abc", "share-0123456789AB",
		"share-0123456789ag", "Share-0123456789ab", "shares-0123456789a", "0123456789ab",
		"share-0123456789ab ", " share-0123456789ab", "share-+123456789ab", "grant-0123456789ab",
	} {
		if ValidShareID(id) {
			t.Errorf("ValidShareID(%q) is true", id)
		}
	}
	if !ValidShareID("share-0123456789ab") {
		t.Error("ValidShareID(share-0123456789ab) is false")
	}
}

// Whom a share is for. Bad input: another address at the domain, a domain
// that ends like the shared one (evilexample.com), a subdomain, the domain
// itself given as an address, an address with two '@', and the same
// address with a trailing dot or text.
func TestShareFor(t *testing.T) {
	exact := Share{Guest: "bob@example.com"}
	domain := Share{Guest: "@example.com"}
	for _, c := range []struct {
		sh    Share
		email string
		want  bool
	}{
		{exact, "bob@example.com", true},
		{exact, "Bob@Example.COM", true},
		{exact, "carol@example.com", false},
		{exact, "bob@example.com.", false},
		{exact, "bob@example.com.evil.net", false},
		{exact, "xbob@example.com", false},
		{exact, "bob@sub.example.com", false},
		{exact, "@example.com", false},
		{exact, "", false},
		{domain, "x@example.com", true},
		{domain, "X@EXAMPLE.com", true},
		{domain, "x@evilexample.com", false},
		{domain, "x@sub.example.com", false}, // a subdomain is another domain
		{domain, "x@example.com.evil.net", false},
		{domain, "x@example.co", false},
		{domain, "@example.com", false},
		{domain, "a@b@example.com", false},
		{domain, "example.com", false},
		{domain, "", false},
	} {
		if got := c.sh.For(c.email); got != c.want {
			t.Errorf("Share{Guest: %q}.For(%q) = %t, want %t", c.sh.Guest, c.email, got, c.want)
		}
	}
}

// A guest's user name is their whole address. Bad input: characters no
// user name has (mapped to '_'), an address without a local part or '@',
// and one too long for a name (70 bytes), or one whose name would start
// with punctuation.
func TestGuestUser(t *testing.T) {
	for _, c := range []struct{ email, want string }{
		{"bob@example.com", "bob_example.com"},
		{"Bob@Example.COM", "bob_example.com"},
		{"bob.smith@mail.example.com", "bob.smith_mail.example.com"},
		{"Bob+tag@Example.com", ""}, // '+' has no place in a name
		{"b_o-b@example.com", "b_o-b_example.com"},
		{"@example.com", ""},
		{"bob", ""},
		{"", ""},
		{"+bob@example.com", ""},
		{".bob@example.com", ""},
		{"bob@example", ""},                            // no domain name
		{strings.Repeat("b", 58) + "@example.com", ""}, // 70 bytes
		{strings.Repeat("b", 51) + "@example.com", strings.Repeat("b", 51) + "_example.com"}, // 63: the most
		{strings.Repeat("b", 52) + "@example.com", ""},                                       // 64
		{"böb@example.com", ""},
	} {
		got := GuestUser(c.email)
		if got != c.want {
			t.Errorf("GuestUser(%q) = %q, want %q", c.email, got, c.want)
		}
		if got != "" && !authz.ValidName(got) {
			t.Errorf("GuestUser(%q) = %q, which is not a valid user name", c.email, got)
		}
	}
}

// GuestUser's doc promises "two guests never share a name". Bad input: two
// different addresses whose names are the same.
func TestGuestUserDistinct(t *testing.T) {
	for _, pair := range [][2]string{
		{"a.b@example.com", "a@b.example.com"},
		{"bob+x@example.com", "bob_x@example.com"},
	} {
		if a, b := GuestUser(pair[0]), GuestUser(pair[1]); a != "" && a == b {
			t.Errorf("GuestUser(%q) = GuestUser(%q) = %q: two guests share a name", pair[0], pair[1], a)
		}
	}
}

// A share is checked before a store records it, and a refused one leaves
// nothing behind. Bad input is named in each case.
func TestAddShareRefusals(t *testing.T) {
	s, _, c := openShareStore(t)
	now := c.now()
	for _, bad := range []struct {
		what   string
		change func(*Share)
		why    string // in the error
	}{
		{"a bad ID", func(sh *Share) { sh.ID = "share-XYZ" }, "NewShareID's form"},
		{"no ID", func(sh *Share) { sh.ID = "" }, "NewShareID's form"},
		{"a bad user", func(sh *Share) { sh.User = "Alice" }, "names must be"},
		{"Until before Created", func(sh *Share) { sh.Until = sh.Created.Add(-time.Hour) }, "a share lasts"},
		{"Until at Created", func(sh *Share) { sh.Until = sh.Created }, "a share lasts"},
		{"longer than MaxShareLife", func(sh *Share) { sh.Until = sh.Created.Add(MaxShareLife + 11*time.Minute) }, "a share lasts"},
		{"a name that is no label", func(sh *Share) { sh.Name = "Web" }, "not a reverse name's label"},
		{"a name starting with '-'", func(sh *Share) { sh.Name = "-web" }, "not a reverse name's label"},
		{"no name", func(sh *Share) { sh.Name = "" }, "not a reverse name's label"},
		{"By a device of another user", func(sh *Share) { sh.By = "bob@laptop" }, "needs its approver"},
		{"By no device ID", func(sh *Share) { sh.By = "laptop" }, "needs its approver"},
		{"no By", func(sh *Share) { sh.By = "" }, "needs its approver"},
		{"By a share", func(sh *Share) { sh.By = ShareApprover + NewShareID() }, "needs its approver"},
		{"By a sign-in without a subject", func(sh *Share) { sh.By = SignInApprover }, "needs the provider's subject"},
		{"a guest not normalised", func(sh *Share) { sh.Guest = "Bob@example.com" }, "as ParseGuest returns it"},
		{"a domain not normalised", func(sh *Share) { sh.Guest = "@Example.com" }, "as ParseGuest returns it"},
		{"a guest that is no address", func(sh *Share) { sh.Guest = "bob" }, "no '@'"},
	} {
		sh := aliceShare(now)
		bad.change(&sh)
		err := s.AddShare(sh, 0)
		if err == nil || !strings.Contains(err.Error(), bad.why) {
			t.Errorf("AddShare with %s: %v; want a refusal saying %q", bad.what, err, bad.why)
		}
		if cerr := CheckShare(sh); (cerr == nil) != (err == nil) {
			t.Errorf("%s: CheckShare says %v, AddShare %v", bad.what, cerr, err)
		}
	}
	if got := s.Shares(); len(got) != 0 {
		t.Fatalf("refused shares were recorded: %+v", got)
	}
	// The limits themselves are fine: MaxShareLife, a sign-in, a domain.
	for _, good := range []func(*Share){
		func(sh *Share) { sh.Until = sh.Created.Add(MaxShareLife) },
		func(sh *Share) { sh.By = SignInApprover + "s-alice" },
		func(sh *Share) { sh.Guest = "@example.com" },
	} {
		sh := aliceShare(now)
		good(&sh)
		addShare(t, s, sh)
	}
	// The same ID twice.
	dup := s.Shares()[0]
	if err := s.AddShare(dup, 0); err == nil {
		t.Fatal("a share whose ID exists was recorded again")
	}
	if n := len(s.Shares()); n != 3 {
		t.Fatalf("%d shares after 3 were added and a duplicate refused", n)
	}
}

// A user's shares that have not ended are bounded. Bad input: one more than
// the bound (given, and DefaultMaxShares when 0); shares that are revoked
// or past their end do not count, nor do another user's.
func TestAddShareBound(t *testing.T) {
	s, _, c := openShareStore(t)
	now := c.now()
	ids := make([]string, 3)
	for i := range ids {
		ids[i] = addShare(t, s, aliceShare(now)).ID
	}
	if err := s.AddShare(aliceShare(now), 3); !errors.Is(err, ErrTooManyShares) {
		t.Fatalf("a fourth share with a bound of 3: %v; want ErrTooManyShares", err)
	}
	bob := Share{ID: NewShareID(), Name: "api", Guest: "@example.com", User: "bob", By: "bob@pc", Created: now, Until: now.Add(time.Hour)}
	if err := s.AddShare(bob, 3); err != nil {
		t.Fatalf("another user's share while alice is at her bound: %v", err)
	}
	if _, err := s.RevokeShare(ids[0]); err != nil {
		t.Fatal(err)
	}
	if err := s.AddShare(aliceShare(now), 3); err != nil {
		t.Fatalf("a share once one was revoked: %v", err)
	}
	if err := s.AddShare(aliceShare(now), 3); !errors.Is(err, ErrTooManyShares) {
		t.Fatalf("a share past the bound again: %v; want ErrTooManyShares", err)
	}
	// One that ends sooner: once it ends it no longer counts.
	short := aliceShare(now)
	short.Until = now.Add(time.Minute)
	s2, _, c2 := openShareStore(t)
	for range 2 {
		addShare(t, s2, aliceShare(c2.now()))
	}
	addShare(t, s2, short)
	if err := s2.AddShare(aliceShare(c2.now()), 3); !errors.Is(err, ErrTooManyShares) {
		t.Fatalf("a fourth share with a bound of 3: %v; want ErrTooManyShares", err)
	}
	c2.advance(time.Minute) // short ends exactly now
	if err := s2.AddShare(aliceShare(c2.now()), 3); err != nil {
		t.Fatalf("a share once one ended: %v", err)
	}

	// max 0 is DefaultMaxShares.
	s3, _, c3 := openShareStore(t)
	for i := range DefaultMaxShares {
		if err := s3.AddShare(aliceShare(c3.now()), 0); err != nil {
			t.Fatalf("share %d of %d: %v", i+1, DefaultMaxShares, err)
		}
	}
	if err := s3.AddShare(aliceShare(c3.now()), 0); !errors.Is(err, ErrTooManyShares) {
		t.Fatalf("share %d with the default bound: %v; want ErrTooManyShares", DefaultMaxShares+1, err)
	}
}

// Shares are saved: a store opened again on the path lists them as they
// were, revoked ones too. Bad input: none; a lost share would let its
// guests' devices be refused (or a revoked one, live).
func TestSharesPersist(t *testing.T) {
	s, path, c := openShareStore(t)
	a := addShare(t, s, aliceShare(c.now()))
	c.advance(time.Minute)
	b := aliceShare(c.now())
	b.Guest, b.By = "@example.com", SignInApprover+"s-alice"
	addShare(t, s, b)
	c.advance(time.Minute)
	if _, err := s.RevokeShare(a.ID); err != nil {
		t.Fatal(err)
	}
	again, err := Open(path, WithClock(c.now))
	if err != nil {
		t.Fatal(err)
	}
	got := again.Shares()
	if len(got) != 2 || got[0].ID != a.ID || got[1].ID != b.ID {
		t.Fatalf("shares after a reload: %+v; want %s then %s", got, a.ID, b.ID)
	}
	if !got[0].Revoked || !got[0].RevokedAt.Equal(shareT0.Add(2*time.Minute)) {
		t.Errorf("the revoked share after a reload: %+v; want revoked at %s", got[0], shareT0.Add(2*time.Minute))
	}
	if got[1].Revoked || got[1].Guest != "@example.com" || got[1].By != b.By || got[1].Name != "web" || got[1].User != "alice" ||
		!got[1].Created.Equal(b.Created) || !got[1].Until.Equal(b.Until) {
		t.Errorf("share after a reload: %+v; want %+v", got[1], b)
	}
	if _, err := again.RevokeShare(NewShareID()); !errors.Is(err, ErrNotFound) {
		t.Errorf("revoking a share that does not exist: %v; want ErrNotFound", err)
	}
}

// Shares that ended more than ShareKeep ago are forgotten at the next
// AddShare; younger ones stay. Bad input: a share past its end by more than
// ShareKeep, one revoked that long ago (before its end), and ones that ended
// less long ago, which must stay.
func TestSharesPruned(t *testing.T) {
	s, path, c := openShareStore(t)
	old := addShare(t, s, aliceShare(c.now())) // ends at T0+1h
	revoked := aliceShare(c.now())
	revoked.Until = c.now().Add(20 * 24 * time.Hour)
	addShare(t, s, revoked)
	if _, err := s.RevokeShare(revoked.ID); err != nil { // ended at T0
		t.Fatal(err)
	}
	recent := aliceShare(c.now())
	recent.Until = c.now().Add(10 * 24 * time.Hour)
	addShare(t, s, recent)
	enrolKey(t, s, "alice", "laptop", "laptop key")
	if _, err := enrolGuest(s, "bob.example.com", "pc", old.ID); err != nil {
		t.Fatal(err)
	}

	c.advance(ShareKeep) // old ended ShareKeep-1h ago: kept
	addShare(t, s, aliceShare(c.now()))
	if n := len(s.Shares()); n != 4 {
		t.Fatalf("%d shares before any ended ShareKeep ago; want 4", n)
	}
	c.advance(time.Hour + time.Second) // old and revoked ended over ShareKeep ago
	last := addShare(t, s, aliceShare(c.now()))
	var ids []string
	for _, sh := range s.Shares() {
		ids = append(ids, sh.ID)
	}
	if len(ids) != 3 || ids[0] != recent.ID || ids[2] != last.ID {
		t.Fatalf("shares after pruning: %v; want recent %s, then the two added since", ids, recent.ID)
	}
	again, err := Open(path, WithClock(c.now))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(again.Shares()); n != 3 {
		t.Fatalf("%d shares on disk after pruning; want 3", n)
	}
	// The guest of a forgotten share stays refused.
	if _, err := s.Lookup("bob.example.com@pc"); !errors.Is(err, authz.ErrRevoked) || !strings.Contains(err.Error(), "no longer exists") {
		t.Fatalf("the guest of a share forgotten: %v; want ErrRevoked saying the share no longer exists", err)
	}
}

// A guest's sign-in for a share enrols a device scoped to the share's name,
// granted by the share, which connects until the share's end. Bad input:
// the clock past Until.
func TestGuestEnrolAndExpiry(t *testing.T) {
	s, path, c := openShareStore(t)
	enrolKey(t, s, "alice", "laptop", "laptop key")
	sh := addShare(t, s, aliceShare(c.now()))
	d, err := enrolGuest(s, "bob.example.com", "pc", sh.ID)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := authz.GuestScope("web")
	if d.Scope != want || d.Scope != "guest:web" || d.GrantedBy != "share:"+sh.ID || d.SSOSubject != "s-bob.example.com" || d.Revoked {
		t.Fatalf("the guest's device: %+v; want scope guest:web, granted by share:%s", d, sh.ID)
	}
	// The deny list judges a guest's device by its share's approver.
	if got, by := s.Scope(d.ID), s.GrantedBy(d.ID); got != "guest:web" || by != "alice@laptop" {
		t.Fatalf("Scope, GrantedBy = %q, %q; want guest:web, the share's approver alice@laptop", got, by)
	}
	if g, err := s.Lookup(d.ID); err != nil || len(g) != 0 {
		t.Fatalf("Lookup of a live share's guest: %v, %v; want no groups, no error", g, err)
	}
	again, err := Open(path, WithClock(c.now))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := again.Lookup(d.ID); err != nil {
		t.Fatalf("Lookup of the guest after a reload: %v", err)
	}
	if got := again.Scope(d.ID); got != "guest:web" {
		t.Fatalf("the guest's scope after a reload: %q", got)
	}

	c.advance(time.Hour - time.Second)
	if _, err := s.Lookup(d.ID); err != nil {
		t.Fatalf("Lookup a second before the share's end: %v", err)
	}
	c.advance(time.Second)
	_, err = s.Lookup(d.ID)
	end := sh.Until.UTC().Format(time.RFC3339)
	if !errors.Is(err, authz.ErrRevoked) || !strings.Contains(err.Error(), "ended at "+end) || !strings.Contains(err.Error(), sh.ID) {
		t.Fatalf("Lookup at the share's end: %v; want ErrRevoked saying %s ended at %s", err, sh.ID, end)
	}
	if _, err := enrolGuest(s, "bob.example.com", "phone", sh.ID); !errors.Is(err, ErrShareEnded) {
		t.Fatalf("a guest's sign-in for an ended share: %v; want ErrShareEnded", err)
	}
	if _, err := s.Device("bob.example.com@phone"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the refused guest's device: %v; want none", err)
	}
}

// Revoking a share ends its guests' access at once. Bad input: a guest's
// device of a revoked share; a sign-in for it; a sign-in for a share that
// does not exist; a share whose approver is gone (a device the store does
// not have, a sign-in of an account the user is not bound to).
func TestShareEnded(t *testing.T) {
	s, _, c := openShareStore(t)
	enrolKey(t, s, "alice", "laptop", "laptop key")
	sh := addShare(t, s, aliceShare(c.now()))
	other := addShare(t, s, aliceShare(c.now()))
	d, err := enrolGuest(s, "bob.example.com", "pc", sh.ID)
	if err != nil {
		t.Fatal(err)
	}
	d2, err := enrolGuest(s, "bob.example.com", "tablet", other.ID)
	if err != nil {
		t.Fatal(err)
	}
	c.advance(time.Minute)
	got, err := s.RevokeShare(sh.ID)
	if err != nil || !got.Revoked || !got.RevokedAt.Equal(c.now()) {
		t.Fatalf("RevokeShare: %+v, %v; want revoked now", got, err)
	}
	if l := shareByID(t, s, sh.ID); !l.Revoked {
		t.Fatalf("Shares lists the revoked share as %+v", l)
	}
	if _, err := s.Lookup(d.ID); !errors.Is(err, authz.ErrRevoked) || !strings.Contains(err.Error(), "was revoked") {
		t.Fatalf("the guest of a revoked share: %v; want ErrRevoked saying it was revoked", err)
	}
	if _, err := s.Lookup(d2.ID); err != nil {
		t.Fatalf("the guest of another share: %v", err)
	}
	// Revoking again changes nothing.
	c.advance(time.Minute)
	if again, err := s.RevokeShare(sh.ID); err != nil || !again.RevokedAt.Equal(got.RevokedAt) {
		t.Fatalf("revoking again: %+v, %v; want it as it was", again, err)
	}

	for _, bad := range []struct {
		what  string
		share func() string
	}{
		{"a revoked share", func() string { return sh.ID }},
		{"a share that does not exist", func() string { return NewShareID() }},
		{"a share by a device the store does not have", func() string {
			x := aliceShare(c.now())
			x.By = "alice@ghost"
			return addShare(t, s, x).ID
		}},
		{"a share by a sign-in of an account alice is not bound to", func() string {
			x := aliceShare(c.now())
			x.By = SignInApprover + "s-alice"
			return addShare(t, s, x).ID
		}},
	} {
		if _, err := enrolGuest(s, "bob.example.com", "phone", bad.share()); !errors.Is(err, ErrShareEnded) {
			t.Errorf("a guest's sign-in for %s: %v; want ErrShareEnded", bad.what, err)
		}
	}
	if _, err := s.Device("bob.example.com@phone"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a refused guest's device: %v; want none", err)
	}
}

// A share enrols at most MaxGuestsPerShare guests' devices that are not
// revoked, whoever's. Bad input: one more; a revoked one frees its room.
func TestShareFull(t *testing.T) {
	s, _, c := openShareStore(t)
	enrolKey(t, s, "alice", "laptop", "laptop key")
	sh := aliceShare(c.now())
	sh.Guest = "@example.com"
	addShare(t, s, sh)
	other := addShare(t, s, aliceShare(c.now()))
	for i := range MaxGuestsPerShare {
		user := []string{"bob.example.com", "carol.example.com"}[i%2]
		if _, err := enrolGuest(s, user, fmt.Sprintf("d%d", i), sh.ID); err != nil {
			t.Fatalf("guest device %d of %d: %v", i+1, MaxGuestsPerShare, err)
		}
	}
	_, err := enrolGuest(s, "dave.example.com", "pc", sh.ID)
	if !errors.Is(err, ErrShareFull) {
		t.Fatalf("guest device %d: %v; want ErrShareFull", MaxGuestsPerShare+1, err)
	}
	if s.HasUser("dave.example.com") {
		t.Fatal("a refused guest's user was created")
	}
	if _, err := enrolGuest(s, "dave.example.com", "pc", other.ID); err != nil {
		t.Fatalf("a guest of another share while this one is full: %v", err)
	}
	if err := s.RevokeDevice("bob.example.com@d0"); err != nil {
		t.Fatal(err)
	}
	if _, err := enrolGuest(s, "dave.example.com", "phone", sh.ID); err != nil {
		t.Fatalf("a guest once a revoked one freed its room: %v", err)
	}
	if _, err := enrolGuest(s, "dave.example.com", "laptop", sh.ID); !errors.Is(err, ErrShareFull) {
		t.Fatalf("one more again: %v; want ErrShareFull", err)
	}
}

// A share lives as long as its approving device. Bad input: the device
// revoked; another device of the user enrolled again with another key. The
// same key again is the same machine and keeps its shares; a device
// enrolled again after its revocation does not bring them back.
func TestShareEndsWithApproverDevice(t *testing.T) {
	s, _, c := openShareStore(t)
	enrolKey(t, s, "alice", "laptop", "laptop key")
	enrolKey(t, s, "alice", "phone", "phone key")
	byLaptop := addShare(t, s, aliceShare(c.now()))
	byPhone := aliceShare(c.now())
	byPhone.By = "alice@phone"
	addShare(t, s, byPhone)
	gl, err := enrolGuest(s, "bob.example.com", "pc", byLaptop.ID)
	if err != nil {
		t.Fatal(err)
	}
	gp, err := enrolGuest(s, "bob.example.com", "tablet", byPhone.ID)
	if err != nil {
		t.Fatal(err)
	}

	c.advance(time.Minute)
	if err := s.RevokeDevice("alice@laptop"); err != nil {
		t.Fatal(err)
	}
	if l := shareByID(t, s, byLaptop.ID); !l.Revoked || !l.RevokedAt.Equal(c.now()) {
		t.Fatalf("the share after its approver was revoked: %+v; want revoked now", l)
	}
	if _, err := s.Lookup(gl.ID); !errors.Is(err, authz.ErrRevoked) {
		t.Fatalf("the guest after the share's approver was revoked: %v; want ErrRevoked", err)
	}
	if l := shareByID(t, s, byPhone.ID); l.Revoked {
		t.Fatalf("a share by another device ended: %+v", l)
	}
	if _, err := s.Lookup(gp.ID); err != nil {
		t.Fatalf("the guest of a share by another device: %v", err)
	}
	if _, err := enrolGuest(s, "bob.example.com", "phone", byLaptop.ID); !errors.Is(err, ErrShareEnded) {
		t.Fatalf("a sign-in for the share of a revoked approver: %v; want ErrShareEnded", err)
	}
	enrolKey(t, s, "alice", "laptop", "new laptop key")
	if _, err := s.Lookup(gl.ID); !errors.Is(err, authz.ErrRevoked) {
		t.Fatalf("the guest after the approver was enrolled again: %v; want the share ended for good", err)
	}

	enrolKey(t, s, "alice", "phone", "phone key") // the same machine again
	if _, err := s.Lookup(gp.ID); err != nil {
		t.Fatalf("the guest after the approver enrolled again with its key: %v", err)
	}
	enrolKey(t, s, "alice", "phone", "the thief's key")
	if l := shareByID(t, s, byPhone.ID); !l.Revoked {
		t.Fatalf("the share after its approver's name got another key: %+v; want revoked", l)
	}
	if _, err := s.Lookup(gp.ID); !errors.Is(err, authz.ErrRevoked) {
		t.Fatalf("the guest after the approver's name got another key: %v; want ErrRevoked", err)
	}
}

// A share approved by signing in lives as long as its user is bound to that
// account. Bad input: the user unbound (then bound again to the same
// account, which does not bring the share back).
func TestShareEndsWithUnbind(t *testing.T) {
	s, _, c := openShareStore(t)
	if err := s.BindUser("alice", "s-alice"); err != nil {
		t.Fatal(err)
	}
	sh := aliceShare(c.now())
	sh.By = SignInApprover + "s-alice"
	addShare(t, s, sh)
	g, err := enrolGuest(s, "bob.example.com", "pc", sh.ID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Lookup(g.ID); err != nil {
		t.Fatalf("the guest of a share by the bound account: %v", err)
	}
	c.advance(time.Minute)
	if was, err := s.UnbindUser("alice"); err != nil || was != "s-alice" {
		t.Fatalf("UnbindUser: %q, %v", was, err)
	}
	if l := shareByID(t, s, sh.ID); !l.Revoked || !l.RevokedAt.Equal(c.now()) {
		t.Fatalf("the share after its account was unbound: %+v; want revoked now", l)
	}
	if _, err := s.Lookup(g.ID); !errors.Is(err, authz.ErrRevoked) {
		t.Fatalf("the guest after the share's account was unbound: %v; want ErrRevoked", err)
	}
	if err := s.BindUser("alice", "s-alice"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Lookup(g.ID); !errors.Is(err, authz.ErrRevoked) {
		t.Fatalf("the guest after the account was bound again: %v; want the share ended for good", err)
	}
	if _, err := enrolGuest(s, "bob.example.com", "phone", sh.ID); !errors.Is(err, ErrShareEnded) {
		t.Fatalf("a sign-in for the share after the unbind: %v; want ErrShareEnded", err)
	}
}

// A guest whose share ended signs in for a new one. Bad input: the guest's
// devices of the ended share, which may no longer connect, yet are counted
// against SignIn.Max.
func TestGuestDevicesOfEndedShareCount(t *testing.T) {
	s, _, c := openShareStore(t)
	enrolKey(t, s, "alice", "laptop", "laptop key")
	first := addShare(t, s, aliceShare(c.now()))
	in := func(device, share string) SignIn {
		return SignIn{User: "bob.example.com", Device: device, PublicKey: []byte(device), Subject: "s-bob", Groups: []string{}, Max: 2, Share: share}
	}
	for _, dev := range []string{"pc", "phone"} {
		if _, err := s.EnrollSignIn(in(dev, first.ID)); err != nil {
			t.Fatal(err)
		}
	}
	c.advance(2 * time.Hour) // first ended
	second := addShare(t, s, aliceShare(c.now()))
	if _, err := s.EnrollSignIn(in("pc2", second.ID)); err != nil {
		t.Fatalf("a sign-in for a new share once the devices of the old one may no longer connect: %v", err)
	}
}

// A share ends with its approving device on tpd's deny list (tpd revoke
// --device), as an application's grant does. Bad input: the approver on the
// deny list only, the store not told.
func TestShareApproverOnDenyList(t *testing.T) {
	s, _, c := openShareStore(t)
	enrolKey(t, s, "alice", "laptop", "laptop key")
	sh := addShare(t, s, aliceShare(c.now()))
	g, err := enrolGuest(s, "bob.example.com", "pc", sh.ID)
	if err != nil {
		t.Fatal(err)
	}
	var deny authz.DenyList
	deny.Add(authz.DenyDevice, "alice@laptop")
	// authz.Verify's check of a grant's approver, for the guest's device:
	_, denied := deny.DeniesApprover(authz.Identity{DeviceID: g.ID}, s.GrantedBy(g.ID))
	_, lerr := s.Lookup(g.ID)
	if !denied && lerr == nil {
		t.Fatalf("the guest of a share whose approver alice@laptop is on the deny list connects (GrantedBy %q)", s.GrantedBy(g.ID))
	}
}

// A share's ID is never used twice: a guest's device of a share the store
// forgot would come back with the new share. Bad input: a share, made by
// another person for another name, that reuses the forgotten share's ID;
// and a guest's device whose share names another name than its scope.
func TestShareIDNotReused(t *testing.T) {
	s, _, c := openShareStore(t)
	enrolKey(t, s, "alice", "laptop", "laptop key")
	enrolKey(t, s, "mallory", "pc", "pc key")
	old := addShare(t, s, aliceShare(c.now()))
	d, err := enrolGuest(s, "bob_example.com", "pc", old.ID)
	if err != nil {
		t.Fatal(err)
	}
	c.advance(time.Hour + ShareKeep + time.Minute) // ended, and kept no more
	fresh := addShare(t, s, Share{ID: NewShareID(), Name: "toy", Guest: "eve@example.com", User: "mallory", By: "mallory@pc",
		Created: c.now(), Until: c.now().Add(time.Hour)}) // prunes the old share
	if _, err := s.Share(old.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the old share is still kept: %v", err)
	}
	reuse := Share{ID: old.ID, Name: "toy", Guest: "eve@example.com", User: "mallory", By: "mallory@pc", Created: c.now(), Until: c.now().Add(time.Hour)}
	if err := s.AddShare(reuse, 0); err == nil || !strings.Contains(err.Error(), "was used before") {
		t.Fatalf("a share reusing a forgotten share's ID: %v; want it refused", err)
	}
	if _, err := s.Lookup(d.ID); !errors.Is(err, authz.ErrRevoked) {
		t.Fatalf("the old guest's device after the reuse was refused: %v; want it refused", err)
	}
	// Even a share of that ID for another name lets no device in whose
	// scope names its old name.
	a := Approvers{Shares: map[string]*Share{old.ID: &fresh}}
	stale := Device{ID: d.ID, Scope: "guest:web", GrantedBy: ShareApprover + old.ID}
	if err := a.Gone(&stale, c.now()); err == nil || !strings.Contains(err.Error(), "is not the name its share") {
		t.Fatalf("a guest's device whose share names another name: %v; want it refused", err)
	}
	if by := a.SharedBy(&stale); by != "" {
		t.Fatalf("SharedBy of that device = %q; want none", by)
	}
}
