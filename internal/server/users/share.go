package users

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tp-proxy/tp/authz"
)

// Share is a person's gift of one reverse name to an outside person (a
// guest) for a limited time: someone the identity provider vouches for, by
// their email address or its domain, signs in (dlogin --sso) and gets a
// device that may connect to that name and nothing else (authz.Scope
// guest:LABEL), until the share ends. A share lives as long as its approver
// (a device, or a sign-in on the website: Device.GrantedBy's forms), and
// ends for good when revoked.
type Share struct {
	ID string `json:"id"` // NewShareID
	// Name is the reverse name's label the guest may connect to.
	Name string `json:"name"`
	// Guest is who may take the share: "bob@example.com", or "@example.com"
	// for anyone whose verified address the provider gives at that domain.
	Guest string `json:"guest"`
	// User is the person who shared; By is their approving device or
	// SignInApprover+subject.
	User      string    `json:"user"`
	By        string    `json:"by"`
	Created   time.Time `json:"created"`
	Until     time.Time `json:"until"`
	Revoked   bool      `json:"revoked,omitempty"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// ShareApprover prefixes a share's ID in Device.GrantedBy for a guest's
// device: it lives as long as the share does.
const ShareApprover = "share:"

// Bounds of shares.
const (
	// MaxShareLife bounds how long a share lasts.
	MaxShareLife = 30 * 24 * time.Hour
	// DefaultMaxShares bounds a user's shares that have not ended.
	DefaultMaxShares = 20
	// MaxGuestsPerShare bounds the guests' devices one share enrols (a
	// domain's people, or one person's several devices).
	MaxGuestsPerShare = 20
	// MaxSharesKept bounds a user's shares a store keeps, ended ones
	// included (until ShareKeep after their end): sharing and revoking in
	// a loop cannot fill the store.
	MaxSharesKept = 100
	// MaxSharesStored bounds the shares a store keeps, ended ones included.
	MaxSharesStored = 10000
	// ShareKeep is how long an ended share stays listed before a store
	// forgets it.
	ShareKeep = 30 * 24 * time.Hour
)

// ErrTooManyShares is a share refused by AddShare: its user has as many that
// have not ended as allowed, or the store is full. ErrSharesKept: its user
// has MaxSharesKept shares kept, ended ones included. ErrShareIDUsed: the ID
// is (or was) another share's.
// ErrStoreFull: the store holds MaxSharesStored shares.
var (
	ErrTooManyShares = errors.New("too many shares")
	ErrSharesKept    = errors.New("too many shares kept")
	ErrShareIDUsed   = errors.New("the share ID was used before")
	ErrStoreFull     = errors.New("the store holds as many shares as it keeps")
)

// NewShareID is a fresh share ID ("share-" and 12 hex digits).
func NewShareID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "share-" + hex.EncodeToString(b[:])
}

// ValidShareID says whether id has NewShareID's form.
func ValidShareID(id string) bool {
	h, ok := strings.CutPrefix(id, "share-")
	if !ok || len(h) != 12 {
		return false
	}
	_, err := hex.DecodeString(h)
	return err == nil && strings.ToLower(h) == h
}

// ParseGuest checks who a share is for: an email address or "@domain", in
// ASCII, returned in lower case.
func ParseGuest(g string) (string, error) {
	at := strings.LastIndexByte(g, '@')
	bad := func(why string) (string, error) {
		return "", fmt.Errorf("guest %q: %s; give an email address (bob@example.com) or a domain (@example.com)", g, why)
	}
	switch {
	case len(g) > 254:
		return bad("longer than an email address can be")
	case at < 0:
		return bad("no '@'")
	case !printableASCII(g):
		return bad("only plain ASCII letters, digits and punctuation, no spaces")
	case strings.Count(g, "@") > 1:
		return bad("more than one '@'")
	}
	domain := strings.ToLower(g[at+1:])
	if !validDomain(domain) {
		return bad(fmt.Sprintf("%q is not a domain name", g[at+1:]))
	}
	return strings.ToLower(g[:at]) + "@" + domain, nil
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// validDomain says whether d is a lower-case domain name of two labels or more.
func validDomain(d string) bool {
	if len(d) > 253 || !strings.Contains(d, ".") {
		return false
	}
	for _, l := range strings.Split(d, ".") {
		if !authz.ValidLabel(l) {
			return false
		}
	}
	return true
}

// CheckShare validates a share before a store records it.
func CheckShare(sh Share) error {
	switch {
	case !ValidShareID(sh.ID):
		return fmt.Errorf("share ID %q: want NewShareID's form", sh.ID)
	case !authz.ValidName(sh.User):
		return fmt.Errorf("user %q: %w", sh.User, ErrBadName)
	case sh.Until.Sub(sh.Created) < time.Minute || sh.Until.Sub(sh.Created) > MaxShareLife+10*time.Minute:
		return fmt.Errorf("a share lasts from a minute to %s", MaxShareLife)
	}
	if _, err := authz.GuestScope(sh.Name); err != nil {
		return fmt.Errorf("name %q is not a reverse name's label", sh.Name)
	}
	if g, err := ParseGuest(sh.Guest); err != nil {
		return err
	} else if g != sh.Guest {
		return fmt.Errorf("guest %q: give it as ParseGuest returns it", sh.Guest)
	}
	if sub, ok := strings.CutPrefix(sh.By, SignInApprover); ok {
		if sub == "" {
			return errors.New("a share approved by signing in needs the provider's subject")
		}
	} else if u, _, err := authz.SplitDeviceID(sh.By); err != nil || u != sh.User {
		return fmt.Errorf("a share needs its approver, a device of user %s or a sign-in, not %q", sh.User, sh.By)
	}
	return nil
}

// For says whether the share is for the person with that verified email
// address: theirs exactly, or any at the share's domain.
func (sh Share) For(email string) bool {
	e := strings.ToLower(email)
	if strings.HasPrefix(sh.Guest, "@") {
		return strings.HasSuffix(e, sh.Guest) && strings.Count(e, "@") == 1 && !strings.HasPrefix(e, "@")
	}
	return e == sh.Guest
}

// Live says whether the share has not ended at now (revoked or past Until;
// its approver is the caller's to check: Approvers.Gone).
func (sh Share) Live(now time.Time) bool { return !sh.Revoked && now.Before(sh.Until) }

// Counts says whether sh counts against its user's bound at now.
func (sh Share) Counts(now time.Time) bool { return sh.Live(now) }

// Approvers is what Gone looks a grant's approver up in: a store's devices,
// users and shares (or a listing of them).
type Approvers struct {
	Devices map[string]*Device
	Users   map[string]*User
	Shares  map[string]*Share
}

// Gone says why d, a granted device (an application's grant or a guest's
// device), may no longer connect at now: its approver is gone
// (ApproverGone), or its share ended, or the share's approver is gone. Nil
// for a device not granted, or whose approver lives.
func (a Approvers) Gone(d *Device, now time.Time) error {
	id, ok := strings.CutPrefix(d.GrantedBy, ShareApprover)
	if !ok && d.Scope.Guest() != "" { // a guest's scope comes only from a share, which ends it
		return fmt.Errorf("device %s has a guest's scope but no share: %w", d.ID, authz.ErrRevoked)
	}
	if !ok {
		return ApproverGone(d, a.Devices[d.GrantedBy], a.Users[d.User])
	}
	sh := a.Shares[id]
	switch {
	case sh == nil:
		return fmt.Errorf("device %s was a guest's by a share that no longer exists: %w", d.ID, authz.ErrRevoked)
	case sh.Name != d.Scope.Guest():
		return fmt.Errorf("device %s's scope %q is not the name its share %s gives: %w", d.ID, d.Scope, sh.ID, authz.ErrRevoked)
	case sh.Revoked:
		return fmt.Errorf("the share of %s with %s (%s) was revoked, and %s's access ended with it: %w", sh.Name, sh.Guest, sh.ID, d.ID, authz.ErrRevoked)
	}
	return a.shareEnded(*sh, now)
}

// shareEnded says why a share that is not revoked has ended at now: past
// its end, or its approver is gone (a share lives as long as its approver,
// as a grant does); nil when it lives.
func (a Approvers) shareEnded(sh Share, now time.Time) error {
	if !now.Before(sh.Until) {
		return fmt.Errorf("the share of %s with %s (%s) ended at %s; ask %s to share it again: %w", sh.Name, sh.Guest, sh.ID, sh.Until.UTC().Format(time.RFC3339), sh.User, authz.ErrRevoked)
	}
	as := &Device{ID: "guest", User: sh.User, GrantedBy: sh.By}
	if err := ApproverGone(as, a.Devices[sh.By], a.Users[sh.User]); err != nil {
		return fmt.Errorf("the share of %s with %s (%s) ended with its approver %s: %w", sh.Name, sh.Guest, sh.ID, sh.By, authz.ErrRevoked)
	}
	return nil
}

// ListApprovers indexes a listing of users (Store.Users) and shares
// (Store.Shares) for Gone and ShareState, with the devices each share
// enrolled (guests' devices by share ID).
func ListApprovers(list []UserInfo, shares []Share) (Approvers, map[string][]string) {
	a := Approvers{Devices: map[string]*Device{}, Users: map[string]*User{}, Shares: map[string]*Share{}}
	guests := map[string][]string{}
	for i := range shares {
		a.Shares[shares[i].ID] = &shares[i]
	}
	for _, u := range list {
		a.Users[u.Name] = &u.User
		for _, d := range u.Devices {
			a.Devices[d.ID] = &d
			if id, ok := strings.CutPrefix(d.GrantedBy, ShareApprover); ok {
				guests[id] = append(guests[id], d.ID)
			}
		}
	}
	return a, guests
}

// ShareState is what a share is at now: "revoked"; "ended" (past its end,
// its approver gone, or on the deny list as denied says, which may be nil);
// or "active".
func (a Approvers) ShareState(sh Share, now time.Time, denied func(deviceID string) bool) string {
	switch {
	case sh.Revoked:
		return "revoked"
	case a.shareEnded(sh, now) != nil, denied != nil && denied(sh.ApproverID()):
		return "ended"
	}
	return "active"
}

// By is who approved a grant whose Device.GrantedBy is grantedBy, as the
// deny list judges it (authz.Granter): for a guest's device, its share's
// approver (ApproverID; "" when the share is gone); otherwise grantedBy.
func (a Approvers) By(grantedBy string) string {
	id, ok := strings.CutPrefix(grantedBy, ShareApprover)
	if !ok {
		return grantedBy
	}
	if sh := a.Shares[id]; sh != nil {
		return sh.ApproverID()
	}
	return ""
}

// SharedBy is the user who shared its name with d, a guest's device, "" for
// any other device or one whose share is gone (authz.Sharer).
func (a Approvers) SharedBy(d *Device) string {
	id, ok := strings.CutPrefix(d.GrantedBy, ShareApprover)
	if !ok {
		return ""
	}
	if sh := a.Shares[id]; sh != nil && sh.Name == d.Scope.Guest() {
		return sh.User
	}
	return ""
}

// ApproverID is the device that approved the share, as the deny list judges
// it: By, or for a share made by signing in on the website, USER@sign-in
// (a deny-list entry of the user denies it).
func (sh Share) ApproverID() string {
	if strings.HasPrefix(sh.By, SignInApprover) {
		return authz.DeviceID(sh.User, SignInDevice)
	}
	return sh.By
}

// SortShares sorts shares oldest first.
func SortShares(s []Share) {
	slices.SortFunc(s, func(a, b Share) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
}

// GuestUser is the TP user name of a guest with that verified email address
// ("bob@example.com" is "bob_example.com"), "" when it gives none: guests
// are named by their whole address, '@' written as '_', which a domain never
// holds, so that two addresses never give one name. An address whose local
// part holds more than letters, digits, '.', '_' and '-' gives none.
func GuestUser(email string) string {
	e := strings.ToLower(email)
	at := strings.LastIndexByte(e, '@')
	if at < 1 || !validDomain(e[at+1:]) {
		return ""
	}
	for i := 0; i < at; i++ {
		switch c := e[i]; {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '.', c == '_', c == '-':
		default:
			return ""
		}
	}
	name := e[:at] + "_" + e[at+1:]
	if !authz.ValidName(name) {
		return ""
	}
	return name
}

// AddShare records sh after CheckShare; max (DefaultMaxShares when 0)
// bounds its user's shares that have not ended.
func (s *File) AddShare(sh Share, max int) error {
	if err := CheckShare(sh); err != nil {
		return err
	}
	if max <= 0 {
		max = DefaultMaxShares
	}
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.st.Shares == nil {
		s.st.Shares = map[string]*Share{}
	}
	s.pruneSharesLocked(now)
	n, kept := 0, 0
	for _, o := range s.st.Shares {
		if o.User == sh.User && o.Counts(now) {
			n++
		}
		if o.User == sh.User {
			kept++
		}
	}
	if n >= max {
		return fmt.Errorf("user %s has %d shares that have not ended: %w", sh.User, n, ErrTooManyShares)
	}
	if kept >= MaxSharesKept {
		return fmt.Errorf("user %s has %d shares kept, ended ones included (they are forgotten %s after their end): %w", sh.User, kept, ShareKeep, ErrSharesKept)
	}
	for _, d := range s.st.Devices { // an ID is never used twice, even after its share is forgotten
		if d.GrantedBy == ShareApprover+sh.ID {
			return fmt.Errorf("share %s: %w", sh.ID, ErrShareIDUsed)
		}
	}
	if len(s.st.Shares) >= MaxSharesStored {
		return fmt.Errorf("the store holds %d shares: %w", len(s.st.Shares), ErrStoreFull)
	}
	if s.st.Shares[sh.ID] != nil {
		return fmt.Errorf("share %s: %w", sh.ID, ErrShareIDUsed)
	}
	c := sh
	s.st.Shares[sh.ID] = &c
	if err := s.saveLocked(); err != nil {
		delete(s.st.Shares, sh.ID)
		return err
	}
	return nil
}

// pruneSharesLocked forgets shares that ended more than ShareKeep ago.
func (s *File) pruneSharesLocked(now time.Time) {
	for id, sh := range s.st.Shares {
		end := sh.Until
		if sh.Revoked && !sh.RevokedAt.IsZero() && sh.RevokedAt.Before(end) {
			end = sh.RevokedAt
		}
		if now.Sub(end) > ShareKeep {
			delete(s.st.Shares, id)
		}
	}
}

// Shares lists the store's shares, oldest first.
func (s *File) Shares() []Share {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]Share, 0, len(s.st.Shares))
	for _, sh := range s.st.Shares {
		out = append(out, *sh)
	}
	SortShares(out)
	return out
}

// RevokeShare ends a share for good: its guests' devices may no longer
// connect.
func (s *File) RevokeShare(id string) (Share, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sh := s.st.Shares[id]
	if sh == nil {
		return Share{}, fmt.Errorf("share %s: %w", id, ErrNotFound)
	}
	if !sh.Revoked {
		sh.Revoked, sh.RevokedAt = true, s.now()
		if err := s.saveLocked(); err != nil {
			sh.Revoked, sh.RevokedAt = false, time.Time{}
			return Share{}, err
		}
	}
	return *sh, nil
}

// SharedBy implements authz.Sharer.
func (s *File) SharedBy(deviceID string) string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if d := s.st.Devices[deviceID]; d != nil {
		return s.approversLocked().SharedBy(d)
	}
	return ""
}

// Share returns the share with that ID.
func (s *File) Share(id string) (Share, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if sh := s.st.Shares[id]; sh != nil {
		return *sh, nil
	}
	return Share{}, fmt.Errorf("share %s: %w", id, ErrNotFound)
}

// approversLocked is the store's devices, users and shares, for Gone.
func (s *File) approversLocked() Approvers {
	return Approvers{Devices: s.st.Devices, Users: s.st.Users, Shares: s.st.Shares}
}
