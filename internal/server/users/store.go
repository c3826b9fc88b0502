// Package users is tpd's user store: users and their groups, enrolled devices with
// their long-lived device public keys, and one-time enrollment tokens (kept hashed).
// [Store] is what tpd uses; [File], the embedded default, persists to one JSON
// file written atomically, with one tpd as its only writer. internal/server/pgstore
// implements Store in PostgreSQL for several tpd instances.
package users

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/lib/atomicfile"
)

// Errors callers match on.
var (
	ErrBadToken = errors.New("enrollment token is unknown, expired or already used; ask your administrator for a new one (tpd enroll)")
	ErrNotFound = errors.New("not found")
	// ErrOtherAccount is a sign-in for a user bound to another account at
	// the identity provider (BindUser).
	ErrOtherAccount = errors.New("the user belongs to another account at the identity provider")
	// ErrDeviceExists, ErrDeviceRevoked and ErrTooManyDevices are a sign-in
	// enrolment refused by EnrollSignIn, changing nothing.
	ErrDeviceExists   = errors.New("the device is already enrolled")
	ErrDeviceRevoked  = errors.New("the device has been revoked")
	ErrTooManyDevices = errors.New("the user has as many devices enrolled by sign-in as the server allows")
	// ErrShareEnded and ErrShareFull are a guest's sign-in refused by
	// EnrollSignIn: the share is gone, revoked, past its end or ended with
	// its approver; or it has MaxGuestsPerShare devices already.
	ErrShareEnded = errors.New("the share has ended")
	ErrShareFull  = errors.New("the share has as many guests' devices as allowed")
	ErrBadName    = errors.New("names must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit")
	ErrTooMany    = errors.New("too many pending enrollment tokens; wait for some to expire or be used")
	// ErrUnavailable means the store could not be reached (a shared database
	// that does not answer); nothing was changed, and trying later may work.
	ErrUnavailable = errors.New("the user store is unavailable")
	maxTokens      = 10000
	maxGroups      = 64
	maxTokenTTL    = 30 * 24 * time.Hour
	tokenEntropy   = 24
)

// User is a person who may enroll devices.
type User struct {
	Name     string    `json:"name"`
	Groups   []string  `json:"groups"`
	Created  time.Time `json:"created"`
	Disabled bool      `json:"disabled,omitempty"`
	// SSOSubject is the identity provider's subject (sub) of the person the
	// user is: set by the user's first sign-in, after which a sign-in of any
	// other account (say, one given the same email address later) is refused.
	SSOSubject string `json:"sso_subject,omitempty"`
}

// Device is one enrolled device of a user.
type Device struct {
	ID        string    `json:"id"` // user@device
	User      string    `json:"user"`
	Name      string    `json:"name"`
	PublicKey []byte    `json:"public_key,omitempty"` // PKIX DER of the device key; empty until enrolled
	Created   time.Time `json:"created"`
	LastLogin time.Time `json:"last_login,omitzero"`
	Revoked   bool      `json:"revoked,omitempty"`
	RevokedAt time.Time `json:"revoked_at,omitzero"` // zero when not recorded
	// SSOSubject is the identity provider's subject (the ID token's sub) of
	// the person who enrolled the device by single sign-on; "" for a device
	// enrolled with a token. With sso-renew: sign-in, its renewals need a
	// fresh sign-in of that subject.
	SSOSubject string `json:"sso_subject,omitempty"`
	// Scope narrows what the device may do before the policy is asked
	// (authz.Scope): "" for none, "expose:LABEL" for a credential that may
	// only keep LABEL exposed. Enrolling the device again keeps it.
	Scope authz.Scope `json:"scope,omitempty"`
	// GrantedBy is the device whose person approved this one's grant
	// (Store.EnrollGrant), "" for a device enrolled otherwise. A grant lives
	// as long as its approver: revoking that device ends it.
	GrantedBy string `json:"granted_by,omitempty"`
}

type token struct {
	Hash    string    `json:"hash"` // hex sha256 of the token
	User    string    `json:"user"`
	Device  string    `json:"device"`
	Expires time.Time `json:"expires"`
}

type state struct {
	Users   map[string]*User   `json:"users"`
	Devices map[string]*Device `json:"devices"`
	Tokens  []token            `json:"tokens"`
	Shares  map[string]*Share  `json:"shares,omitempty"`
}

// Store is tpd's user store. Implementations are safe for concurrent use.
// Reads (Device, Lookup, HasUser, Users) answer from memory, so that a
// connection's check never waits for a disk or a database.
type Store interface {
	authz.Directory
	// Scope is a device's scope (authz.Scoper): the policy's Authorizer reads
	// it at every decision.
	authz.Scoper
	// GrantedBy is the device that approved a granted one (authz.Granter):
	// Lookup refuses a grant whose approver is revoked in the store, and
	// authz.Verify one whose approver is on tpd's deny list.
	authz.Granter
	// Enroll creates the user if needed (setting groups when given), reserves
	// the device name and returns a one-time token that binds a device key to
	// user@device. Enrolling an existing device again lets its owner replace
	// the device key.
	Enroll(user, device string, groups []string, ttl time.Duration) (Enrollment, error)
	// Redeem uses up a token (once, whichever tpd is asked) and registers pub
	// (PKIX DER) as the device's key.
	Redeem(tok string, pub []byte) (Device, error)
	// Device returns the enrolled device with that ID.
	Device(id string) (Device, error)
	// TouchLogin records a successful login of the device.
	TouchLogin(id string) error
	// BindUser binds user, created if need be, to the identity provider's
	// subject at its first sign-in; ErrOtherAccount, changing nothing, when it
	// is bound to another subject.
	BindUser(user, subject string) error
	// UnbindUser clears the user's binding to the identity provider's
	// subject (an administrator's decision: the next account that signs in as
	// the user binds it again) and returns the subject it was bound to, ""
	// when none; ErrNotFound when there is no such user.
	UnbindUser(user string) (string, error)
	// EnrollSignIn enrols a device by sign-in in one step judged by the
	// store: it creates the user if need be, registers the key of a device
	// that is absent (or a name reserved without a key), bound to the
	// provider's subject, and sets the user's groups when given. A device
	// with a key is ErrDeviceExists, a revoked one ErrDeviceRevoked, and
	// Max devices of the user enrolled by sign-in and not revoked already
	// ErrTooManyDevices; then nothing changes. Of two sign-ins for one name
	// at once, whichever tpd is asked, one enrols.
	EnrollSignIn(in SignIn) (Device, error)
	// SignedIn records a sign-in at the identity provider for the device:
	// the provider's subject of its person, and, when groups is not nil, the
	// user's groups as the provider gave them.
	SignedIn(id, subject string, groups []string) error
	// RevokeDevice stops a device from logging in or connecting.
	RevokeDevice(id string) error
	// EnrollGrant creates the device an approval gives an application (a
	// grant): its key and its scope, in one step judged by the store. The
	// same grant again (same key and scope) returns the device as it is;
	// another device of that name is ErrDeviceExists (ErrDeviceRevoked when
	// revoked); Max scoped devices of the user not revoked already is
	// ErrTooManyDevices. The user must exist (ErrNotFound).
	EnrollGrant(g Grant) (Device, error)
	// DeviceByKey returns the device whose key is pub (PKIX DER).
	DeviceByKey(pub []byte) (Device, bool)
	// Devices lists the user's devices, oldest first (nil for a user that
	// does not exist).
	Devices(user string) []Device
	// SetScope gives the device (enrolled, or reserved by Enroll) a scope
	// (authz.Scope), which narrows what it may do before the policy is asked.
	SetScope(id string, scope authz.Scope) error
	// AddShare records a share (CheckShare; its ID from NewShareID); max
	// (DefaultMaxShares when 0) of its user's shares that have not ended
	// already is ErrTooManyShares. Shares that ended ShareKeep ago are
	// forgotten.
	AddShare(sh Share, max int) error
	// Shares lists the shares, oldest first.
	Shares() []Share
	// Share returns the share with that ID (ErrNotFound).
	Share(id string) (Share, error)
	// SharedBy is the user who shared its name with a guest's device
	// (authz.Sharer): tpd tells the name's agent, which admits guests of
	// its own user's shares.
	SharedBy(deviceID string) string
	// RevokeShare ends a share for good (ErrNotFound when there is none):
	// its guests' devices may no longer connect.
	RevokeShare(id string) (Share, error)
	// DropTokens deletes the pending enrollment tokens of user@device, or of
	// all the user's devices when device is empty, and says how many.
	DropTokens(user, device string) (int, error)
	// HasUser reports whether a user of that name exists.
	HasUser(name string) bool
	// Users lists users sorted by name, with their devices (keys omitted).
	Users() []UserInfo
	// Generation changes whenever the store changes (groups, devices,
	// revocations, tokens), by this tpd or another, so that tpd knows when to
	// re-check live sessions.
	Generation() uint64
}

// File is the embedded user store: one JSON file. It is safe for concurrent use.
type File struct {
	path string
	now  func() time.Time

	mu  sync.RWMutex
	st  state
	gen uint64 // counts saves; see Generation

	// byKey indexes the devices by key (DeviceByKey, which an application
	// waiting for its grant asks every few seconds), as of gen byKeyGen.
	byKey    map[string]*Device
	byKeyGen uint64
}

var _ Store = (*File)(nil)

// Option adjusts a Store.
type Option func(*File)

// WithClock replaces time.Now, for tests of expiry.
func WithClock(now func() time.Time) Option { return func(s *File) { s.now = now } }

// Open reads the store at path, or starts an empty one if the file does not exist.
func Open(path string, opts ...Option) (*File, error) {
	s := &File{path: path, now: time.Now, st: state{Users: map[string]*User{}, Devices: map[string]*Device{}}}
	for _, o := range opts {
		o(s)
	}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return s, nil
	case err != nil:
		return nil, fmt.Errorf("read user store: %w", err)
	}
	if err := json.Unmarshal(b, &s.st); err != nil {
		return nil, fmt.Errorf("user store %s is not valid JSON (%v); restore it from a backup", path, err)
	}
	if s.st.Users == nil {
		s.st.Users = map[string]*User{}
	}
	if s.st.Devices == nil {
		s.st.Devices = map[string]*Device{}
	}
	return s, nil
}

// Enrollment is what an administrator gets back from Enroll.
type Enrollment struct {
	Token    string
	DeviceID string
	Expires  time.Time
}

// Enroll creates the user if needed (setting groups when given), reserves the device
// name and returns a one-time token that binds a device key to user@device.
// Enrolling an existing device again lets its owner replace the device key.
func (s *File) Enroll(user, device string, groups []string, ttl time.Duration) (Enrollment, error) {
	tok, err := CheckEnroll(user, device, groups, ttl)
	if err != nil {
		return Enrollment{}, err
	}
	now := s.now()

	s.mu.Lock()
	defer s.mu.Unlock()
	s.expireTokensLocked(now)
	if len(s.st.Tokens) >= maxTokens {
		return Enrollment{}, ErrTooMany
	}
	u := s.st.Users[user]
	if u == nil {
		u = &User{Name: user, Created: now, Groups: []string{}}
		s.st.Users[user] = u
	}
	if groups != nil {
		u.Groups = NormalizeGroups(groups)
	}
	id := authz.DeviceID(user, device)
	if _, ok := s.st.Devices[id]; !ok {
		s.st.Devices[id] = &Device{ID: id, User: user, Name: device, Created: now}
	}
	exp := now.Add(ttl)
	s.st.Tokens = append(s.st.Tokens, token{Hash: HashToken(tok), User: user, Device: device, Expires: exp})
	if err := s.saveLocked(); err != nil {
		return Enrollment{}, err
	}
	return Enrollment{Token: tok, DeviceID: id, Expires: exp}, nil
}

// Redeem uses up a token and registers pub (PKIX DER) as the device's key.
func (s *File) Redeem(tok string, pub []byte) (Device, error) {
	h := HashToken(tok)
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expireTokensLocked(now)
	idx := -1
	for i, t := range s.st.Tokens {
		if subtle.ConstantTimeCompare([]byte(t.Hash), []byte(h)) == 1 {
			idx = i
		}
	}
	if idx < 0 {
		return Device{}, ErrBadToken
	}
	t := s.st.Tokens[idx]
	s.st.Tokens = slices.Delete(s.st.Tokens, idx, idx+1)
	id := authz.DeviceID(t.User, t.Device)
	d := s.st.Devices[id]
	if d == nil {
		d = &Device{ID: id, User: t.User, Name: t.Device, Created: now}
		s.st.Devices[id] = d
	}
	if len(d.PublicKey) > 0 && string(d.PublicKey) != string(pub) {
		s.endGrantsLocked(id, now) // another machine under the name: the grants it approved end
	}
	d.PublicKey = slices.Clone(pub)
	d.Revoked, d.RevokedAt = false, time.Time{}
	d.SSOSubject = "" // a new key is a new enrollment: a sign-in binds it again
	if err := s.saveLocked(); err != nil {
		return Device{}, err
	}
	return *d, nil
}

// Device returns the enrolled device with that ID.
func (s *File) Device(id string) (Device, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	d := s.st.Devices[id]
	if d == nil {
		return Device{}, fmt.Errorf("device %s: %w", id, ErrNotFound)
	}
	return *d, nil
}

// TouchLogin records a successful login of the device.
func (s *File) TouchLogin(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.st.Devices[id]
	if d == nil {
		return fmt.Errorf("device %s: %w", id, ErrNotFound)
	}
	d.LastLogin = s.now()
	return s.saveLocked()
}

// BindUser binds user to the provider's subject at its first sign-in.
func (s *File) BindUser(user, subject string) error {
	if subject == "" {
		return errors.New("no subject to bind the user to")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.st.Users[user]
	switch {
	case u == nil:
		u = &User{Name: user, Created: s.now(), Groups: []string{}}
		s.st.Users[user] = u
	case u.SSOSubject == subject:
		return nil
	case u.SSOSubject != "":
		return fmt.Errorf("user %s: %w", user, ErrOtherAccount)
	}
	u.SSOSubject = subject
	return s.saveLocked()
}

// UnbindUser clears the user's binding to the provider's subject.
func (s *File) UnbindUser(user string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.st.Users[user]
	if u == nil {
		return "", fmt.Errorf("user %s: %w", user, ErrNotFound)
	}
	was := u.SSOSubject
	if was == "" {
		return "", nil
	}
	u.SSOSubject = ""
	s.endGrantsLocked(SignInApprover+was, s.now()) // what that account approved ends with the binding
	return was, s.saveLocked()
}

// endGrantsLocked revokes, for good, the grants whose approver is by: a device
// revoked in the store or enrolled again with another key, or a sign-in whose
// account the user is no longer bound to. A grant lives as long as its
// approver, and does not come back with a device of the same name or the
// same account bound again.
func (s *File) endGrantsLocked(by string, now time.Time) {
	for _, d := range s.st.Devices {
		if d.GrantedBy == by && !d.Revoked {
			d.Revoked, d.RevokedAt = true, now
		}
	}
	for _, sh := range s.st.Shares { // and so do the approver's shares
		if sh.By == by && !sh.Revoked {
			sh.Revoked, sh.RevokedAt = true, now
		}
	}
}

// Grant is a device an approval creates for an application (Store.EnrollGrant).
type Grant struct {
	User, Device string
	// By is the approving device's ID, one of User's: the grant is revoked
	// with it.
	By        string
	PublicKey []byte // PKIX DER of the application's key
	Scope     authz.Scope
	// Max bounds the user's scoped devices that are not revoked, this one
	// included; at least 1.
	Max int
	// Revoked, when set, says which devices are revoked outside the store
	// (tpd's deny list: tpd revoke --device), so they are not counted.
	Revoked func(deviceID string) bool
}

// ErrKeyInUse is a grant for a key another device holds (or held, revoked):
// a key belongs to one device, so an application whose grant was revoked
// must make a new key.
var ErrKeyInUse = errors.New("the key belongs to another device")

// Counts says whether d, one of the user's devices, counts against g's bound.
func (g Grant) Counts(d Device) bool {
	return d.Scope != "" && !d.Revoked && (g.Revoked == nil || !g.Revoked(d.ID))
}

// CheckGrant validates a grant's names, key, scope and bound.
func CheckGrant(g Grant) error {
	if _, err := CheckEnroll(g.User, g.Device, nil, time.Minute); err != nil {
		return err
	}
	if len(g.PublicKey) == 0 {
		return errors.New("no key to enrol")
	}
	if sub, ok := strings.CutPrefix(g.By, SignInApprover); ok {
		if sub == "" {
			return errors.New("a grant approved by signing in needs the provider's subject")
		}
	} else if u, _, err := authz.SplitDeviceID(g.By); err != nil || u != g.User {
		return fmt.Errorf("a grant needs its approver, a device of user %s or a sign-in, not %q", g.User, g.By)
	}
	if sc, err := authz.ParseScope(string(g.Scope)); err != nil || sc == "" {
		return fmt.Errorf("a grant needs a scope: %v", err)
	}
	if g.Max < 1 {
		return fmt.Errorf("a bound of %d scoped devices per user; at least 1", g.Max)
	}
	return nil
}

// sameGrant says whether d is the device g would create.
func sameGrant(d Device, g Grant) bool {
	return !d.Revoked && d.Scope == g.Scope && string(d.PublicKey) == string(g.PublicKey)
}

// EnrollGrant creates a granted device under the store's lock.
func (s *File) EnrollGrant(g Grant) (Device, error) {
	if err := CheckGrant(g); err != nil {
		return Device{}, err
	}
	id := authz.DeviceID(g.User, g.Device)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.st.Users[g.User] == nil {
		return Device{}, fmt.Errorf("user %s: %w", g.User, ErrNotFound)
	}
	if d := s.st.Devices[id]; d != nil {
		switch {
		case sameGrant(*d, g) && s.approversLocked().Gone(d, s.now()) == nil:
			return *d, nil
		case d.Revoked, sameGrant(*d, g): // the same grant, ended with its approver: the application needs a new key
			return Device{}, fmt.Errorf("device %s: %w", id, ErrDeviceRevoked)
		}
		return Device{}, fmt.Errorf("device %s: %w", id, ErrDeviceExists)
	}
	n := 0
	for _, o := range s.st.Devices {
		if string(o.PublicKey) == string(g.PublicKey) {
			return Device{}, fmt.Errorf("device %s: %w", o.ID, ErrKeyInUse)
		}
		if o.User == g.User && g.Counts(*o) {
			n++
		}
	}
	if n >= g.Max {
		return Device{}, fmt.Errorf("user %s has %d scoped devices: %w", g.User, n, ErrTooManyDevices)
	}
	d := &Device{ID: id, User: g.User, Name: g.Device, Created: s.now(), PublicKey: slices.Clone(g.PublicKey), Scope: g.Scope, GrantedBy: g.By}
	s.st.Devices[id] = d
	if err := s.saveLocked(); err != nil {
		delete(s.st.Devices, id)
		return Device{}, err
	}
	return *d, nil
}

// DeviceByKey returns the device whose key is pub.
func (s *File) DeviceByKey(pub []byte) (Device, bool) {
	if len(pub) == 0 {
		return Device{}, false
	}
	s.mu.RLock()
	if s.byKeyGen != s.gen || s.byKey == nil {
		// The index is of an older state: build it anew (every change
		// counts in gen, so one build serves the polls until the next).
		s.mu.RUnlock()
		s.mu.Lock()
		if s.byKeyGen != s.gen || s.byKey == nil {
			s.byKey = make(map[string]*Device, len(s.st.Devices))
			for _, d := range s.st.Devices {
				if len(d.PublicKey) > 0 {
					s.byKey[string(d.PublicKey)] = d
				}
			}
			s.byKeyGen = s.gen
		}
		s.mu.Unlock()
		s.mu.RLock()
	}
	defer s.mu.RUnlock()
	if d := s.byKey[string(pub)]; d != nil && s.st.Devices[d.ID] == d && string(d.PublicKey) == string(pub) {
		return *d, true
	}
	return Device{}, false
}

// Devices lists the user's devices, oldest first.
func (s *File) Devices(user string) []Device {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []Device
	for _, d := range s.st.Devices {
		if d.User == user {
			out = append(out, *d)
		}
	}
	SortDevices(out)
	return out
}

// SortDevices orders devices oldest first, then by ID.
func SortDevices(ds []Device) {
	slices.SortFunc(ds, func(a, b Device) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
}

// SignIn is a device a sign-in enrols (Store.EnrollSignIn).
type SignIn struct {
	User, Device string
	PublicKey    []byte   // PKIX DER
	Subject      string   // the provider's sub of the person
	Groups       []string // the user's groups from now on; nil leaves them
	// Max bounds the user's devices enrolled by sign-in that are not
	// revoked, this one included; at least 1.
	Max int
	// Revoked, when set, says which other devices are revoked outside the
	// store (tpd's deny list: tpd revoke --device), so they are not counted.
	Revoked func(deviceID string) bool
	// Share, for a guest's sign-in, is the ID of the share that gives the
	// device its scope (authz.GuestScope of the share's name): the device
	// is granted by it (ShareApprover) and lives as long as it does. At most
	// MaxGuestsPerShare devices of a share that are not revoked; the share
	// must not have ended.
	Share string
}

// counts says whether d counts against a user's bound of devices enrolled
// by sign-in.
func (in SignIn) counts(d Device) bool {
	return d.SSOSubject != "" && !d.Revoked && len(d.PublicKey) > 0 && (in.Revoked == nil || !in.Revoked(d.ID))
}

// Counted says how many of devices (one user's, as rows of a store) count
// against in.Max.
func (in SignIn) Counted(devices []Device) int {
	n := 0
	for _, d := range devices {
		if in.counts(d) {
			n++
		}
	}
	return n
}

// CheckSignIn validates a sign-in enrolment's names, key, subject, groups
// and bound.
func CheckSignIn(in SignIn) error {
	if _, err := CheckEnroll(in.User, in.Device, in.Groups, time.Minute); err != nil {
		return err
	}
	switch {
	case len(in.PublicKey) == 0:
		return errors.New("no device key to enrol")
	case in.Subject == "":
		return errors.New("no subject to bind the device to")
	case in.Max < 1:
		return fmt.Errorf("a bound of %d devices per user enrolled by sign-in; at least 1", in.Max)
	}
	return nil
}

// EnrollSignIn enrols a device by sign-in under the store's lock: the check
// that the name is free and the count of the user's devices are the write's.
func (s *File) EnrollSignIn(in SignIn) (Device, error) {
	if err := CheckSignIn(in); err != nil {
		return Device{}, err
	}
	id := authz.DeviceID(in.User, in.Device)
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.st.Devices[id]
	switch {
	case d != nil && d.Revoked:
		return Device{}, fmt.Errorf("device %s: %w", id, ErrDeviceRevoked)
	case d != nil && len(d.PublicKey) > 0:
		return Device{}, fmt.Errorf("device %s: %w", id, ErrDeviceExists)
	}
	n, guests := 0, 0
	for _, o := range s.st.Devices {
		// A guest's device whose share ended counts no more.
		if o.User == in.User && in.counts(*o) && s.approversLocked().Gone(o, now) == nil {
			n++
		}
		if in.Share != "" && o.GrantedBy == ShareApprover+in.Share && !o.Revoked {
			guests++
		}
	}
	if n >= in.Max {
		return Device{}, fmt.Errorf("user %s has %d: %w", in.User, n, ErrTooManyDevices)
	}
	var scope authz.Scope
	if in.Share != "" {
		sh := s.st.Shares[in.Share]
		if sh == nil {
			return Device{}, fmt.Errorf("share %s: %w", in.Share, ErrShareEnded)
		}
		scope, _ = authz.GuestScope(sh.Name)
		if err := s.approversLocked().Gone(&Device{ID: id, Scope: scope, GrantedBy: ShareApprover + in.Share}, now); err != nil {
			return Device{}, fmt.Errorf("%v: %w", err, ErrShareEnded)
		}
		if guests >= MaxGuestsPerShare {
			return Device{}, fmt.Errorf("share %s has %d guests' devices: %w", in.Share, guests, ErrShareFull)
		}
	}
	u := s.st.Users[in.User]
	if u == nil {
		u = &User{Name: in.User, Created: now, Groups: []string{}}
		s.st.Users[in.User] = u
	}
	if in.Groups != nil {
		u.Groups = NormalizeGroups(in.Groups)
	}
	if d == nil {
		d = &Device{ID: id, User: in.User, Name: in.Device, Created: now}
		s.st.Devices[id] = d
	}
	d.PublicKey = slices.Clone(in.PublicKey)
	d.SSOSubject = in.Subject
	if in.Share != "" {
		d.Scope, d.GrantedBy = scope, ShareApprover+in.Share
	}
	if err := s.saveLocked(); err != nil {
		return Device{}, err
	}
	return *d, nil
}

// SignedIn records a sign-in at the identity provider for the device.
func (s *File) SignedIn(id, subject string, groups []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.st.Devices[id]
	if d == nil {
		return fmt.Errorf("device %s: %w", id, ErrNotFound)
	}
	d.SSOSubject = subject
	if u := s.st.Users[d.User]; u != nil && groups != nil {
		u.Groups = NormalizeGroups(groups)
	}
	return s.saveLocked()
}

// Lookup implements authz.Directory.
func (s *File) Lookup(deviceID string) ([]string, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	d := s.st.Devices[deviceID]
	if d == nil || len(d.PublicKey) == 0 {
		return nil, fmt.Errorf("device %s is not enrolled: %w", deviceID, authz.ErrUnknownDevice)
	}
	// A grant ended with its approver says so, whether the store already
	// marked it revoked (endGrantsLocked) or not (the approver's key replaced
	// on another instance, its binding cleared).
	if err := s.approversLocked().Gone(d, s.now()); err != nil {
		return nil, err
	}
	if d.Revoked {
		return nil, fmt.Errorf("device %s: %w", deviceID, authz.ErrRevoked)
	}
	u := s.st.Users[d.User]
	if u == nil {
		return nil, fmt.Errorf("user %s of device %s no longer exists: %w", d.User, deviceID, authz.ErrUnknownDevice)
	}
	if u.Disabled {
		return nil, fmt.Errorf("user %s is disabled: %w", d.User, authz.ErrRevoked)
	}
	return slices.Clone(u.Groups), nil
}

// GrantedBy implements authz.Granter: for a guest's device, the approver of
// its share.
func (s *File) GrantedBy(deviceID string) string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if d := s.st.Devices[deviceID]; d != nil {
		return Approvers{Shares: s.st.Shares}.By(d.GrantedBy)
	}
	return ""
}

// IsGrant says whether d is a grant: a device an approval created for an
// application (EnrollGrant), also one made before grants recorded their
// approver (GrantedBy empty: its scope and its grant- name tell).
func (d Device) IsGrant() bool {
	return d.GrantedBy != "" || d.Scope != "" && strings.HasPrefix(d.Name, GrantPrefix)
}

// GrantPrefix begins the name of every device a grant creates
// (grant-<the application's code>).
const GrantPrefix = "grant-"

// SignInDevice is the device name of approvals and shares made on TP's
// website by signing in (USER@sign-in, as the policy and the deny list see
// them): no device is enrolled under it.
const SignInDevice = "sign-in"

// SignInApprover prefixes the provider's subject in Device.GrantedBy for a
// grant approved by signing in on TP's website: such a grant lives as long
// as its user is bound to that account (User.SSOSubject).
const SignInApprover = "sign-in:"

// ApproverGone says why a granted device may no longer connect when the
// device that approved it (approver; nil when the store has none of that ID)
// is revoked or gone, or, for a grant approved by signing in, when its user
// (nil when gone) is no longer bound to that account: a grant is revoked
// with its approver. Nil for a device that was not granted, or whose
// approver is live.
func ApproverGone(d *Device, approver *Device, user *User) error {
	sub, signIn := strings.CutPrefix(d.GrantedBy, SignInApprover)
	switch {
	case d.GrantedBy == "":
		return nil
	case signIn && (user == nil || user.SSOSubject != sub):
		return fmt.Errorf("device %s was granted by a sign-in at the identity provider whose account %s is no longer bound to, and the grant ended with it: %w", d.ID, d.User, authz.ErrRevoked)
	case signIn:
		return nil
	case approver == nil:
		return fmt.Errorf("device %s was granted by %s, which no longer exists, and the grant ended with it: %w", d.ID, d.GrantedBy, authz.ErrRevoked)
	case approver.Revoked:
		return fmt.Errorf("device %s was granted by %s, which has been revoked, and the grant ended with it: %w", d.ID, d.GrantedBy, authz.ErrRevoked)
	}
	return nil
}

// Scope is the device's scope ("" when it has none or is unknown).
func (s *File) Scope(deviceID string) authz.Scope {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if d := s.st.Devices[deviceID]; d != nil {
		return d.Scope
	}
	return ""
}

// SetScope gives the device a scope (authz.Scope).
func (s *File) SetScope(id string, scope authz.Scope) error {
	if _, err := authz.ParseScope(string(scope)); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.st.Devices[id]
	if d == nil {
		return fmt.Errorf("device %s: %w", id, ErrNotFound)
	}
	if d.Scope == scope {
		return nil
	}
	d.Scope = scope
	return s.saveLocked()
}

// RevokeDevice stops a device from logging in or connecting.
func (s *File) RevokeDevice(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.st.Devices[id]
	if d == nil {
		return fmt.Errorf("device %s: %w", id, ErrNotFound)
	}
	if !d.Revoked {
		d.Revoked, d.RevokedAt = true, s.now()
	}
	s.endGrantsLocked(id, s.now())
	return s.saveLocked()
}

// DropTokens deletes the pending enrollment tokens of user@device, or of all the
// user's devices when device is empty, so a revoked identity cannot be
// re-enrolled with a token handed out earlier. It returns how many it dropped.
func (s *File) DropTokens(user, device string) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	before := len(s.st.Tokens)
	s.st.Tokens = slices.DeleteFunc(s.st.Tokens, func(t token) bool {
		return t.User == user && (device == "" || t.Device == device)
	})
	n := before - len(s.st.Tokens)
	if n == 0 {
		return 0, nil
	}
	return n, s.saveLocked()
}

// UserInfo is a user with their devices, for listings.
type UserInfo struct {
	User
	Devices       []Device `json:"devices"`
	PendingTokens int      `json:"pending_tokens"`
	// Tokens are the pending enrollment tokens (not their secrets), soonest
	// to expire first.
	Tokens []PendingToken `json:"tokens,omitempty"`
	// Revoked and RevokedAt are filled in by the listing's caller from tpd's
	// deny list (a user is revoked there, not in this store).
	Revoked   bool      `json:"revoked,omitempty"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// PendingToken is an enrollment token not yet redeemed: the device it
// enrols and when it expires.
type PendingToken struct {
	Device  string    `json:"device"`
	Expires time.Time `json:"expires"`
}

// SortTokens orders pending tokens soonest to expire first.
func SortTokens(ts []PendingToken) {
	slices.SortFunc(ts, func(a, b PendingToken) int {
		if c := a.Expires.Compare(b.Expires); c != 0 {
			return c
		}
		return strings.Compare(a.Device, b.Device)
	})
}

// HasUser reports whether a user of that name exists.
func (s *File) HasUser(name string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.st.Users[name] != nil
}

// Users lists users sorted by name, with their devices (keys omitted).
func (s *File) Users() []UserInfo {
	now := s.now()
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]UserInfo, 0, len(s.st.Users))
	for _, u := range s.st.Users {
		ui := UserInfo{User: *u, Devices: []Device{}}
		ui.Groups = slices.Clone(u.Groups)
		for _, d := range s.st.Devices {
			if d.User == u.Name {
				dc := *d
				dc.PublicKey = nil
				ui.Devices = append(ui.Devices, dc)
			}
		}
		for _, t := range s.st.Tokens {
			if t.User == u.Name && now.Before(t.Expires) {
				ui.PendingTokens++
				ui.Tokens = append(ui.Tokens, PendingToken{Device: t.Device, Expires: t.Expires})
			}
		}
		SortTokens(ui.Tokens)
		sort.Slice(ui.Devices, func(i, j int) bool { return ui.Devices[i].ID < ui.Devices[j].ID })
		out = append(out, ui)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (s *File) expireTokensLocked(now time.Time) {
	s.st.Tokens = slices.DeleteFunc(s.st.Tokens, func(t token) bool { return !now.Before(t.Expires) })
}

// Generation changes whenever the store changes (groups, devices, revocations,
// tokens), so that tpd knows when to re-check live sessions.
func (s *File) Generation() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.gen
}

// saveLocked writes the whole state to a temporary file and renames it into place,
// so a crash never leaves a half-written store.
func (s *File) saveLocked() error {
	s.gen++
	b, err := json.MarshalIndent(&s.st, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(s.path, b, 0o600); err != nil {
		return fmt.Errorf("save user store: %w", err)
	}
	return nil
}

// CheckEnroll validates an enrollment's names, groups and token lifetime, and
// returns a fresh one-time token.
func CheckEnroll(user, device string, groups []string, ttl time.Duration) (string, error) {
	if !authz.ValidName(user) || !authz.ValidName(device) {
		return "", fmt.Errorf("user %q, device %q: %w", user, device, ErrBadName)
	}
	if device == SignInDevice {
		return "", fmt.Errorf("device name %q is the one approvals on TP's website are made as (USER@%s); give the device another name", device, SignInDevice)
	}
	if len(groups) > maxGroups {
		return "", fmt.Errorf("at most %d groups per user", maxGroups)
	}
	for _, g := range groups {
		if !authz.ValidName(g) {
			return "", fmt.Errorf("group %q: %w", g, ErrBadName)
		}
	}
	if ttl <= 0 || ttl > maxTokenTTL {
		return "", fmt.Errorf("token lifetime %s must be between 1s and %s", ttl, maxTokenTTL)
	}
	raw := make([]byte, tokenEntropy)
	if _, err := rand.Read(raw); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(raw), nil
}

// NormalizeGroups sorts groups and drops repeats.
func NormalizeGroups(groups []string) []string {
	g := slices.Clone(groups)
	sort.Strings(g)
	return slices.Compact(g)
}

// MaxTokens bounds the pending enrollment tokens a store holds.
func MaxTokens() int { return maxTokens }

// HashToken is how stores keep a token: hex SHA-256, never the token itself.
func HashToken(tok string) string {
	sum := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(sum[:])
}

// TokenRecord is a pending enrollment token as stores keep it (hashed).
type TokenRecord struct {
	Hash    string
	User    string
	Device  string
	Expires time.Time
}

// Export is everything a File holds, for moving it into another store.
type Export struct {
	Users   []User
	Devices []Device
	Tokens  []TokenRecord // unexpired only
	Shares  []Share
}

// Export copies the store's contents, sorted.
func (s *File) Export() Export {
	now := s.now()
	s.mu.RLock()
	defer s.mu.RUnlock()
	var e Export
	for _, u := range s.st.Users {
		c := *u
		c.Groups = slices.Clone(u.Groups)
		e.Users = append(e.Users, c)
	}
	for _, d := range s.st.Devices {
		c := *d
		c.PublicKey = slices.Clone(d.PublicKey)
		e.Devices = append(e.Devices, c)
	}
	for _, t := range s.st.Tokens {
		if now.Before(t.Expires) {
			e.Tokens = append(e.Tokens, TokenRecord{Hash: t.Hash, User: t.User, Device: t.Device, Expires: t.Expires})
		}
	}
	for _, sh := range s.st.Shares {
		e.Shares = append(e.Shares, *sh)
	}
	SortShares(e.Shares)
	sort.Slice(e.Users, func(i, j int) bool { return e.Users[i].Name < e.Users[j].Name })
	sort.Slice(e.Devices, func(i, j int) bool { return e.Devices[i].ID < e.Devices[j].ID })
	sort.Slice(e.Tokens, func(i, j int) bool { return e.Tokens[i].Hash < e.Tokens[j].Hash })
	return e
}
