package acme

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	jose "github.com/go-jose/go-jose/v4"
	"golang.org/x/oauth2"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

// Defaults and bounds of single sign-on.
const (
	// DefaultSSOUserClaim and DefaultSSOGroupsClaim are the ID token's claims
	// that name the TP user and its groups.
	DefaultSSOUserClaim   = "email"
	DefaultSSOGroupsClaim = "groups"
	// ssoMaxAge: an ID token older than this (its iat) enrols no device, so
	// that one that leaked from a log or a proxy long after the sign-in is
	// worth nothing.
	ssoMaxAge = 10 * time.Minute
	// ssoMaxUsed bounds the ID tokens remembered as used (each until it
	// expires, at most ssoMaxAge after its iat).
	ssoMaxUsed = 100_000
	// ssoMaxGroups bounds the groups one sign-in gives a user.
	ssoMaxGroups = 64
	// DefaultSSOMaxDevices bounds a user's devices enrolled by sign-in that
	// are not revoked, when SSO.MaxDevices is 0.
	DefaultSSOMaxDevices = 20
	// ssoDiscoveryTimeout bounds tpd's fetch of the provider's discovery
	// document and keys.
	ssoDiscoveryTimeout = 10 * time.Second
)

// SSO lets people enrol a device by signing in with the organisation's
// OpenID Connect provider (dlogin --sso): the provider vouches for who they
// are, tpd maps its claims to a TP user and groups, and the device's own key
// is registered as with an enrollment token. Sign-ins use the authorization
// code flow with PKCE and a loopback redirect (RFC 8252) in the person's
// browser, or the device authorization grant (RFC 8628), so TP is registered
// at the provider as a public client (no secret) that may use them.
type SSO struct {
	// Issuer is the provider's issuer URL; ClientID is TP's client there.
	Issuer, ClientID string
	// Domain is the email domain whose people may enrol (the ID token's
	// email claim, which must be verified): its local parts are TP's user
	// names. One domain, so that two people never map to one name.
	Domain string
	// UserClaim names the TP user (DefaultSSOUserClaim when empty); an email
	// address gives its local part, lowercased. GroupsClaim lists the user's
	// groups (DefaultSSOGroupsClaim when empty); groups that are not valid TP
	// names are left out and named in the answer.
	UserClaim, GroupsClaim string
	// Scopes are what a sign-in asks the provider for (openid, email and
	// profile when empty).
	Scopes []string
	// GroupsRequired reads an ID token without the groups claim as "no
	// groups" (the user's groups are cleared), for providers that leave the
	// claim out when a person has none; otherwise such a token leaves the
	// groups as they are.
	GroupsRequired bool
	// RenewWithSignIn makes a device enrolled by single sign-on renew only
	// with a fresh sign-in of the person who enrolled it (sso-renew:
	// sign-in): a person the provider disabled or removed loses TP within a
	// certificate's life, and their groups follow the provider's at each
	// renewal. KeepRefresh lets devices keep the provider's refresh token
	// for it (they ask for offline_access).
	RenewWithSignIn, KeepRefresh bool
	// MaxDevices bounds a user's devices enrolled by sign-in that are not
	// revoked (DefaultSSOMaxDevices when 0): a sign-in, or an ID token that
	// leaked, cannot fill the store with devices.
	MaxDevices int
	// HTTPClient reaches the provider (discovery and keys); nil means a
	// client with the system's roots and a 30 s timeout.
	HTTPClient *http.Client
	// Used records the ID tokens that enrolled a device, for every instance
	// that shares it; nil keeps them in this instance's memory (one tpd).
	Used UsedTokens
	// GuestDomains are the email domains guests may come from (share.go):
	// a share with an address needs its domain here, or "*" for any; a
	// share with a whole domain needs that domain named. Empty lets no
	// guest in. Lower case.
	GuestDomains []string

	mu       sync.Mutex
	verifier *oidc.IDTokenVerifier
	endpoint oauth2.Endpoint // the provider's, from its discovery document
	failed   time.Time       // the last failed discovery: none again before ssoRetry
	failure  error
	used     map[[32]byte]time.Time // ID tokens that enrolled a device, until they expire
	clock    func() time.Time       // nil: time.Now; for tests of the keys' refetch bound
}

// ssoRetry: after a failed discovery, requests fail at once for this long
// instead of each making tpd fetch the provider's document again.
const ssoRetry = 10 * time.Second

// Info is what dlogin needs to sign a person in (login.PathSSO).
func (s *SSO) Info() login.SSOInfo {
	scopes := s.Scopes
	if len(scopes) == 0 {
		scopes = []string{oidc.ScopeOpenID, "email", "profile"}
	}
	info := login.SSOInfo{Issuer: s.Issuer, ClientID: s.ClientID, Scopes: scopes}
	if s.RenewWithSignIn {
		info.Renew, info.KeepRefresh = login.RenewSignIn, s.KeepRefresh
		if s.KeepRefresh && !slices.Contains(scopes, oidc.ScopeOfflineAccess) {
			info.Scopes = append(slices.Clone(scopes), oidc.ScopeOfflineAccess)
		}
	}
	return info
}

// errProviderUnreachable is a failure to fetch the provider's discovery
// document or keys: tpd answers 503, nothing is the person's fault.
var errProviderUnreachable = errors.New("identity provider unreachable")

// verifierFor returns the ID token verifier, fetching the provider's
// discovery document the first time (and again after a failure).
func (s *SSO) verifierFor(ctx context.Context) (*oidc.IDTokenVerifier, error) {
	s.mu.Lock()
	v, failed, failure := s.verifier, s.failed, s.failure
	s.mu.Unlock()
	if v != nil {
		return v, nil
	}
	if time.Since(failed) < ssoRetry {
		return nil, failure
	}
	hc := s.HTTPClient
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	// Not the request's context: a client that hangs up must not make the
	// fetch fail (and the next ssoRetry of requests with it).
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ssoDiscoveryTimeout)
	defer cancel()
	p, err := oidc.NewProvider(oidc.ClientContext(ctx, hc), s.Issuer)
	if err != nil {
		err = fmt.Errorf("%w: %v", errProviderUnreachable, err)
		s.mu.Lock()
		s.failed, s.failure = time.Now(), err
		s.mu.Unlock()
		return nil, err
	}
	var doc struct {
		JWKS string   `json:"jwks_uri"`
		Algs []string `json:"id_token_signing_alg_values_supported"`
	}
	if err := p.Claims(&doc); err != nil || doc.JWKS == "" {
		err = fmt.Errorf("%w: the discovery document names no keys (jwks_uri): %v", errProviderUnreachable, err)
		s.mu.Lock()
		s.failed, s.failure = time.Now(), err
		s.mu.Unlock()
		return nil, err
	}
	// The keys are fetched (and refetched when they rotate, within bounds)
	// with this client too, outside any one request.
	algs := ssoAlgs(doc.Algs)
	keys := &ssoKeys{url: doc.JWKS, hc: hc, now: time.Now}
	if s.clock != nil {
		keys.now = s.clock
	}
	for _, a := range algs {
		keys.algs = append(keys.algs, jose.SignatureAlgorithm(a))
	}
	v = oidc.NewVerifier(s.Issuer, keys, &oidc.Config{ClientID: s.ClientID, SupportedSigningAlgs: algs})
	s.mu.Lock()
	s.verifier, s.endpoint = v, p.Endpoint()
	s.mu.Unlock()
	return v, nil
}

// endpoints are the provider's authorization and token endpoints, from its
// discovery document (fetched as verifierFor does).
func (s *SSO) endpoints(ctx context.Context) (oauth2.Endpoint, error) {
	if _, err := s.verifierFor(ctx); err != nil {
		return oauth2.Endpoint{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.endpoint, nil
}

// ssoAlgs are the signing algorithms of the provider's discovery document
// that go-oidc verifies (RS256 when it names none), as go-oidc's own
// verifier takes them.
func ssoAlgs(named []string) []string {
	var algs []string
	for _, a := range named {
		switch a {
		case oidc.RS256, oidc.RS384, oidc.RS512, oidc.ES256, oidc.ES384, oidc.ES512, oidc.PS256, oidc.PS384, oidc.PS512, oidc.EdDSA:
			algs = append(algs, a)
		}
	}
	if len(algs) == 0 {
		algs = []string{oidc.RS256}
	}
	return algs
}

// ssoPerson is who an ID token names, mapped to TP's names.
type ssoPerson struct {
	User string
	// Groups are valid TP group names, sorted, at most ssoMaxGroups; nil
	// when the token has no groups claim (the user's groups stay as they
	// are), empty when the claim lists none (they are cleared).
	Groups  []string
	Ignored []string // the provider's groups left out
	Email   string
	Subject string // the provider's sub: who the person is there, for good
}

// ssoRefusal is a sign-in tpd does not accept, with the sentence for the
// person (403).
type ssoRefusal struct {
	msg string
	// outside is set when the only fault is that the person's verified
	// address is outside the server's domain: a guest, whom a share may
	// let in (share.go).
	outside *ssoPerson
}

func (e *ssoRefusal) Error() string { return e.msg }

func refuse(format string, args ...any) error { return &ssoRefusal{msg: fmt.Sprintf(format, args...)} }

// verify checks an ID token (signature, issuer, audience, expiry, age, one
// use) and maps its claims to a TP user and groups.
func (s *SSO) verify(ctx context.Context, raw string, now time.Time) (ssoPerson, error) {
	p, expiry, err := s.check(ctx, raw, now, "dlogin --sso")
	// A guest's sign-in (outside the domain) is used up as a person's is:
	// one sign-in, one device.
	if r := (*ssoRefusal)(nil); err != nil && !(errors.As(err, &r) && r.outside != nil) {
		return ssoPerson{}, err
	}
	fresh, uerr := s.useOnce(ctx, raw, expiry, now)
	if uerr != nil {
		return ssoPerson{}, fmt.Errorf("%w: %v", users.ErrUnavailable, uerr)
	}
	if !fresh {
		return ssoPerson{}, refuse("this sign-in already enrolled a device: run dlogin --sso again for another")
	}
	return p, err
}

// check verifies an ID token (signature, issuer, audience, expiry, age) and
// maps its claims to TP's names; it says when the token expires. again is
// the command that signs in anew, for the refusals' sentences.
func (s *SSO) check(ctx context.Context, raw string, now time.Time, again string) (ssoPerson, time.Time, error) {
	if typ, ok := tokenType(raw); ok && !strings.EqualFold(typ, "JWT") {
		return ssoPerson{}, time.Time{}, refuse("the token is not an ID token (its type is %q, as an access token's or a logout token's is): sign in again with %s", typ, again)
	}
	v, err := s.verifierFor(ctx)
	if err != nil {
		return ssoPerson{}, time.Time{}, err
	}
	tok, err := v.Verify(ctx, raw)
	if err != nil {
		var exp *oidc.TokenExpiredError
		if errors.As(err, &exp) {
			return ssoPerson{}, time.Time{}, refuse("the sign-in expired at %s: run %s again", exp.Expiry.UTC().Format(time.RFC3339), again)
		}
		if strings.Contains(err.Error(), "fetching keys") {
			return ssoPerson{}, time.Time{}, fmt.Errorf("%w: %v", errProviderUnreachable, err)
		}
		return ssoPerson{}, time.Time{}, refuse("the ID token is not one this server accepts (%v): sign in again with %s", err, again)
	}
	if age := now.Sub(tok.IssuedAt); tok.IssuedAt.IsZero() || age > ssoMaxAge {
		return ssoPerson{}, time.Time{}, refuse("the sign-in is older than %s (issued %s): run %s again", ssoMaxAge, tok.IssuedAt.UTC().Format(time.RFC3339), again)
	}
	var claims map[string]any
	if err := tok.Claims(&claims); err != nil {
		return ssoPerson{}, time.Time{}, refuse("the ID token's claims cannot be read: %v", err)
	}
	p, err := s.person(claims)
	if r := (*ssoRefusal)(nil); errors.As(err, &r) && r.outside != nil {
		if tok.Subject == "" { // no guest either: a guest is bound to their subject
			return ssoPerson{}, time.Time{}, refuse("the ID token names no subject (sub): ask your TP administrator; the provider does not follow OpenID Connect")
		}
		r.outside.Subject = tok.Subject
		return ssoPerson{}, tok.Expiry, r
	}
	if err != nil {
		return ssoPerson{}, time.Time{}, err
	}
	if tok.Subject == "" {
		return ssoPerson{}, time.Time{}, refuse("the ID token names no subject (sub): ask your TP administrator; the provider does not follow OpenID Connect")
	}
	p.Subject = tok.Subject
	return p, tok.Expiry, nil
}

// tokenType is the typ of a JWT's JOSE header, and whether it has one. A
// header that does not decode says none: the verifier refuses the token.
// An ID token's is JWT or absent; another token the provider signs with
// the same key (an access token in JWT form, RFC 9068: at+jwt; a logout
// token: logout+jwt) must not pass for one.
func tokenType(raw string) (string, bool) {
	head, _, ok := strings.Cut(raw, ".")
	if !ok {
		return "", false
	}
	b, err := base64.RawURLEncoding.DecodeString(head)
	if err != nil {
		return "", false
	}
	var h map[string]any
	if json.Unmarshal(b, &h) != nil {
		return "", false
	}
	v, ok := h["typ"]
	if !ok {
		return "", false
	}
	if typ, isString := v.(string); isString {
		return typ, true
	}
	return fmt.Sprint(v), true // not even a string: not JWT
}

// UsedTokens records which ID tokens enrolled a device (by a hash of the
// token), so that each enrols one, whichever instance is shown it.
type UsedTokens interface {
	// UseOnce records key until expires and reports whether it was new.
	UseOnce(ctx context.Context, key string, expires time.Time) (bool, error)
}

// person maps an ID token's claims to TP's user and groups. Names are
// ASCII only: Unicode case folding would make two of the provider's names
// one of TP's (U+212A KELVIN SIGN lowercases to k).
func (s *SSO) person(claims map[string]any) (ssoPerson, error) {
	// The token must be for TP alone: an ID token another application asked
	// for (azp), or one meant for several audiences, is not a sign-in to TP.
	if azp, ok := claims["azp"].(string); ok && azp != s.ClientID {
		return ssoPerson{}, refuse("the ID token was issued to %q, not to TP's client %q: sign in with dlogin --sso", azp, s.ClientID)
	}
	if aud, ok := claims["aud"].([]any); ok && len(aud) > 1 {
		if _, ok := claims["azp"]; !ok {
			return ssoPerson{}, refuse("the ID token is for several audiences and names no authorized party: sign in with dlogin --sso")
		}
	}
	email, _ := claims["email"].(string)
	if email == "" {
		return ssoPerson{}, refuse("the provider sent no email address (scope email); TP needs it to check the domain")
	}
	if !isASCII(email) {
		return ssoPerson{}, refuse("the email address %q is not plain ASCII; TP user names are", email)
	}
	verified := claims["email_verified"] == true || claims["email_verified"] == "true"
	if !verified {
		return ssoPerson{}, refuse("the provider has not verified the email address %s; verify it there and sign in again", email)
	}
	at := strings.LastIndexByte(email, '@')
	if domain := asciiLower(email[at+1:]); at < 1 || domain != asciiLower(s.Domain) {
		r := refuse("people of %q may not enrol devices on this TP server (its sso-domain is %s)", email[at+1:], s.Domain).(*ssoRefusal)
		if at >= 1 {
			r.outside = &ssoPerson{User: users.GuestUser(email), Email: asciiLower(email), Groups: []string{}}
		}
		return ssoPerson{}, r
	}
	claim := s.UserClaim
	if claim == "" {
		claim = DefaultSSOUserClaim
	}
	name, _ := claims[claim].(string)
	if i := strings.LastIndexByte(name, '@'); i >= 0 {
		if asciiLower(name[i+1:]) != asciiLower(s.Domain) {
			return ssoPerson{}, refuse("the provider's %s %q is not of %s", claim, name, s.Domain)
		}
		name = name[:i]
	}
	if !isASCII(name) || !authz.ValidName(asciiLower(name)) {
		return ssoPerson{}, refuse("the provider's %s %q does not give a valid TP user name (lowercase letters, digits, '.', '_' and '-'); ask your TP administrator to set sso-user-claim", claim, claims[claim])
	}
	p := ssoPerson{User: asciiLower(name), Email: email}
	gclaim := s.GroupsClaim
	if gclaim == "" {
		gclaim = DefaultSSOGroupsClaim
	}
	var groups []string
	switch g := claims[gclaim].(type) {
	case nil:
		if s.GroupsRequired { // the provider leaves the claim out for no groups
			p.Groups = []string{}
		}
		return p, nil // no claim: the user's groups stay as they are
	case string:
		groups = []string{g}
	case []any:
		for _, x := range g {
			if str, ok := x.(string); ok {
				groups = append(groups, str)
			}
		}
	}
	p.Groups = []string{}
	for _, g := range groups {
		lg := asciiLower(g)
		if isASCII(g) && authz.ValidName(lg) && len(p.Groups) < ssoMaxGroups {
			p.Groups = append(p.Groups, lg)
		} else {
			p.Ignored = append(p.Ignored, g)
		}
	}
	p.Groups = users.NormalizeGroups(p.Groups)
	return p, nil
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// asciiLower lowercases ASCII letters only.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// useOnce records an ID token as used; false if it was already.
func (s *SSO) useOnce(ctx context.Context, raw string, expiry, now time.Time) (bool, error) {
	h := sha256.Sum256([]byte(raw))
	if s.Used != nil {
		return s.Used.UseOnce(ctx, hex.EncodeToString(h[:]), expiry)
	}
	return s.useOnceHere(h, expiry, now), nil
}

// useOnceHere is useOnce in this instance's memory.
func (s *SSO) useOnceHere(h [32]byte, expiry, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.used == nil {
		s.used = map[[32]byte]time.Time{}
	}
	if _, ok := s.used[h]; ok {
		return false
	}
	if len(s.used) >= ssoMaxUsed {
		for k, exp := range s.used {
			if now.After(exp) {
				delete(s.used, k)
			}
		}
	}
	if len(s.used) >= ssoMaxUsed {
		return false // refused rather than forgetting a token that could be replayed
	}
	s.used[h] = expiry
	return true
}

// sso answers login.PathSSO: 404 when tpd has no provider configured.
func (e *Enroller) sso(w http.ResponseWriter, _ *http.Request) {
	if e.SSO == nil {
		writeErr(w, http.StatusNotFound, "this TP server does not sign people in with an identity provider; ask your TP administrator for an enrollment (tpd enroll USER --device NAME)")
		return
	}
	writeJSON(w, http.StatusOK, e.SSO.Info())
}

// enrollSSO registers a device key for the person an ID token names
// (login.PathEnrollSSO).
func (e *Enroller) enrollSSO(w http.ResponseWriter, r *http.Request) {
	if e.SSO == nil {
		writeErr(w, http.StatusNotFound, "this TP server does not sign people in with an identity provider; ask your TP administrator for an enrollment (tpd enroll USER --device NAME)")
		return
	}
	var req login.EnrollSSORequest
	if !decode(w, r, &req) {
		return
	}
	if !authz.ValidName(req.Device) {
		writeErr(w, http.StatusBadRequest, fmt.Sprintf("device name %q: use lowercase letters, digits, '.', '_' and '-', e.g. laptop", req.Device))
		return
	}
	pub, err := parseP256(req.PublicKey)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "device public_key: "+err.Error())
		return
	}
	if !verify(pub, login.EnrollSSOMessage(req.IDToken, req.Device, req.PublicKey), req.Signature) {
		writeErr(w, http.StatusBadRequest, "signature does not match the device public key")
		return
	}
	p, err := e.SSO.verify(r.Context(), req.IDToken, e.now())
	var refusal *ssoRefusal
	switch {
	case errors.Is(err, users.ErrUnavailable):
		e.unavailable(w, "single sign-on enrollment", err, "so nothing was enrolled; run dlogin --sso again in a minute")
		return
	case errors.As(err, &refusal) && refusal.outside != nil:
		e.enrollGuest(w, r, req, *refusal.outside)
		return
	case errors.As(err, &refusal):
		e.log().Warn("single sign-on enrollment refused", "remote", r.RemoteAddr, "why", refusal.msg)
		writeErr(w, http.StatusForbidden, refusal.msg)
		return
	case err != nil:
		e.log().Error("single sign-on enrollment failed: the identity provider cannot be reached", "issuer", e.SSO.Issuer, "err", err)
		w.Header().Set("Retry-After", "30")
		writeErr(w, http.StatusServiceUnavailable, "the TP server cannot reach the identity provider right now; try again in a minute")
		return
	}
	// A sign-in enrols new devices only: replacing an enrolled device's key
	// would let whoever signs in as the user (or holds a leaked ID token, or
	// approved a code someone else started) lock the device out and take its
	// place. Replacing a key, or enrolling a revoked device again, is the
	// administrator's (tpd enroll). This look is only to refuse early, before
	// the user is bound; EnrollSignIn below decides, atomically.
	id := authz.DeviceID(p.User, req.Device)
	// A device without a key that is not revoked is a name reserved by an
	// enrollment that did not finish (a token never redeemed, a sign-in cut
	// by a database outage): nothing logs in with it, and a sign-in takes it.
	if dev, err := e.Users.Device(id); err == nil && dev.Revoked {
		e.refuseSignInDevice(w, p, req.Device, users.ErrDeviceRevoked)
		return
	} else if err == nil && len(dev.PublicKey) > 0 {
		e.refuseSignInDevice(w, p, req.Device, users.ErrDeviceExists)
		return
	}
	if e.Denied != nil {
		if reason, denied := e.Denied(users.Device{ID: id, User: p.User, Name: req.Device}); denied {
			writeErr(w, http.StatusForbidden, reason)
			return
		}
	}
	// The user is the person the provider's subject names, for good: a
	// sign-in of another account that maps to the same name (an address
	// given to someone new) is refused before anything changes.
	if err := e.Users.BindUser(p.User, p.Subject); err != nil {
		switch {
		case errors.Is(err, users.ErrOtherAccount):
			e.log().Warn("single sign-on enrollment refused: the user belongs to another account at the provider", "user", p.User, "email", p.Email, "remote", r.RemoteAddr)
			writeErr(w, http.StatusForbidden, fmt.Sprintf("the TP user %s belongs to another account at %s than the one you signed in with (was the address %s given to someone else?); ask your TP administrator", p.User, e.SSO.Issuer, p.Email))
		case errors.Is(err, users.ErrUnavailable):
			e.unavailable(w, "single sign-on enrollment", err, "so nothing was enrolled; run dlogin --sso again in a minute")
		default:
			e.log().Error("single sign-on enrollment failed", "err", err)
			writeErr(w, http.StatusInternalServerError, "enrollment failed on the server; try again or ask your administrator to check tpd's log")
		}
		return
	}
	der, _ := base64.StdEncoding.DecodeString(req.PublicKey)
	// One step: of two sign-ins for one name at once (on any instance), one
	// enrols and the other is refused; the device is bound to the person's
	// subject at the provider as it gets its key (sso-renew: sign-in renews
	// it only with their sign-in).
	dev, err := e.Users.EnrollSignIn(users.SignIn{User: p.User, Device: req.Device, PublicKey: der,
		Subject: p.Subject, Groups: p.Groups, Max: e.SSO.maxDevices(), Revoked: e.deniedID})
	switch {
	case errors.Is(err, users.ErrDeviceExists), errors.Is(err, users.ErrDeviceRevoked), errors.Is(err, users.ErrTooManyDevices):
		e.refuseSignInDevice(w, p, req.Device, err)
		return
	case errors.Is(err, users.ErrUnavailable):
		e.unavailable(w, "single sign-on enrollment", err, "so nothing was enrolled; run dlogin --sso again in a minute")
		return
	case err != nil:
		e.log().Error("single sign-on enrollment failed", "err", err)
		writeErr(w, http.StatusInternalServerError, "enrollment failed on the server; try again or ask your administrator to check tpd's log")
		return
	}
	if _, err := e.Users.Lookup(dev.ID); err != nil { // the user is disabled
		_ = e.Users.RevokeDevice(dev.ID)
		writeErr(w, http.StatusForbidden, err.Error()+"; ask your administrator")
		return
	}
	e.log().Info("device enrolled by single sign-on", "device", dev.ID, "email", p.Email, "groups", p.Groups, "ignored_groups", p.Ignored, "remote", r.RemoteAddr)
	if e.Enrolled != nil {
		e.Enrolled(dev, r.RemoteAddr, "single sign-on as "+p.Email)
	}
	writeJSON(w, http.StatusOK, login.EnrollSSOResponse{
		EnrollResponse: login.EnrollResponse{DeviceID: dev.ID, User: dev.User, Device: dev.Name},
		Groups:         p.Groups, Ignored: p.Ignored})
}

// maxDevices is MaxDevices or its default.
func (s *SSO) maxDevices() int {
	if s.MaxDevices > 0 {
		return s.MaxDevices
	}
	return DefaultSSOMaxDevices
}

// deniedID says whether tpd's deny list revokes the device with that ID.
func (e *Enroller) deniedID(id string) bool {
	if e.Denied == nil {
		return false
	}
	user, name, _ := authz.SplitDeviceID(id)
	_, denied := e.Denied(users.Device{ID: id, User: user, Name: name})
	return denied
}

// refuseSignInDevice answers a sign-in enrolment of device that the store
// refused (users.ErrDeviceExists, ErrDeviceRevoked or ErrTooManyDevices)
// with what the person can do about it.
func (e *Enroller) refuseSignInDevice(w http.ResponseWriter, p ssoPerson, device string, err error) {
	id := authz.DeviceID(p.User, device)
	switch {
	case errors.Is(err, users.ErrDeviceRevoked):
		writeErr(w, http.StatusForbidden, fmt.Sprintf("device %q has been revoked; ask your administrator to enroll it again", id))
	case errors.Is(err, users.ErrDeviceExists):
		writeErr(w, http.StatusConflict, fmt.Sprintf("device %q is already enrolled; give this device another name (dlogin --sso --device NAME), or ask your administrator to enroll it again (tpd enroll %s --device %s)", id, p.User, device))
	default:
		max := e.SSO.maxDevices()
		e.log().Warn("single sign-on enrollment refused: the user has as many devices enrolled by sign-in as allowed", "device", id, "max", max)
		writeErr(w, http.StatusForbidden, fmt.Sprintf("%s already has %d devices enrolled by sign-in, the most this server allows: ask your TP administrator to revoke one you no longer use (tpd revoke --device %s@NAME; tpd users lists them), then run dlogin --sso again, or to raise sso-max-devices", p.User, max, p.User))
	}
}

// checkSignIn lets a login of dev (PathAttest) go on: at once, unless the
// server renews devices enrolled by single sign-on only with a fresh sign-in
// (RenewWithSignIn) and dev is one; then idToken must be a sign-in, at most
// ssoMaxAge old, of the person who enrolled it (the provider's subject),
// still mapped to dev's user, and its groups become the user's. A refusal
// says to sign in (login.CodeSignIn), so that dlogin does.
func (e *Enroller) checkSignIn(w http.ResponseWriter, r *http.Request, dev users.Device, idToken string) bool {
	s := e.SSO
	if s == nil || !s.RenewWithSignIn || dev.SSOSubject == "" {
		return true
	}
	signIn := func(status int, msg string) bool {
		e.log().Warn("login refused: a fresh sign-in at the identity provider is needed", "device", dev.ID, "remote", r.RemoteAddr, "why", msg)
		writeJSON(w, status, login.ErrorResponse{Error: msg, Code: login.CodeSignIn})
		return false
	}
	if idToken == "" {
		return signIn(http.StatusUnauthorized, fmt.Sprintf("device %s renews its certificate only with a sign-in at %s: run dlogin to sign in", dev.ID, s.Issuer))
	}
	p, _, err := s.check(r.Context(), idToken, e.now(), "dlogin")
	var refusal *ssoRefusal
	if errors.As(err, &refusal) && refusal.outside != nil && strings.HasPrefix(dev.GrantedBy, users.ShareApprover) {
		// A guest renews with their own sign-in; the share decides the rest.
		p, err = *refusal.outside, nil
	}
	switch {
	case errors.As(err, &refusal):
		return signIn(http.StatusForbidden, refusal.msg)
	case err != nil:
		e.log().Error("login failed: the identity provider cannot be reached", "device", dev.ID, "issuer", s.Issuer, "err", err)
		w.Header().Set("Retry-After", "30")
		writeErr(w, http.StatusServiceUnavailable, "the TP server cannot reach the identity provider right now; try again in a minute (the current certificate stays valid until it expires)")
		return false
	case p.Subject != dev.SSOSubject:
		return signIn(http.StatusForbidden, fmt.Sprintf("this sign-in is of another account at %s than the one that enrolled %s: run dlogin and sign in as that account", s.Issuer, dev.ID))
	case p.User != dev.User: // no sign-in mends this: not CodeSignIn
		e.log().Warn("login refused: the identity provider names the device's person another user", "device", dev.ID, "user", p.User)
		writeErr(w, http.StatusForbidden, fmt.Sprintf("the identity provider now names this account %s, not %s: ask your TP administrator", p.User, dev.User))
		return false
	}
	if err := e.Users.SignedIn(dev.ID, p.Subject, p.Groups); err != nil {
		if errors.Is(err, users.ErrUnavailable) {
			e.unavailable(w, "login", err, "so no certificate was issued; try again in a minute")
			return false
		}
		e.log().Error("login failed: recording the sign-in", "device", dev.ID, "err", err)
		writeErr(w, http.StatusInternalServerError, "login failed on the server; ask your administrator to check tpd's log")
		return false
	}
	return true
}
