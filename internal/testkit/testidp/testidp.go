// Package testidp runs a real OpenID Connect provider on loopback for tests:
// zitadel's OpenID provider library (discovery, JWKS, the device
// authorization grant of RFC 8628, ID tokens signed with RS256) over its
// example in-memory storage, with the people and groups a test gives it. A
// test plays the person at the provider with Approve or Deny, as a person
// would on the provider's page, and for the authorization code flow (RFC
// 6749 with PKCE, a loopback redirect of RFC 8252) with SignedIn: who the
// browser that opens the provider's page is signed in as. Everything TP sees
// of the provider is the real protocol.
package testidp

import (
	"context"
	"crypto/sha256"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
	"golang.org/x/text/language"
)

// ClientID is the public client (no secret, device grant) TP is registered
// as; OtherClientID is another application's, whose ID tokens are not for TP.
const (
	ClientID      = "tp"
	OtherClientID = "other-app"
)

// Person is someone who can sign in at the provider.
type Person struct {
	Subject       string // the provider's stable ID (the sub claim)
	Email         string
	EmailVerified bool
	Username      string // preferred_username
	Groups        []string
}

// IdP is a running provider.
type IdP struct {
	// Issuer is the provider's issuer URL (http://127.0.0.1:port).
	Issuer string

	st       *store
	server   *httptest.Server
	callback string // the provider's URL that ends a login: + the auth request's ID
	people   map[string]Person
	// keyFetches counts the requests for the provider's keys (jwks_uri).
	keyFetches atomic.Int64

	mu      sync.Mutex
	session string // the subject the browser is signed in as ("" nobody)
}

// Start runs a provider that knows people; it stops with the test.
func Start(t testing.TB, people ...Person) *IdP {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	issuer := "http://" + srv.Listener.Addr().String()
	users := userStore{}
	for _, p := range people {
		users[p.Subject] = &storage.User{ID: p.Subject, Username: p.Username, Email: p.Email,
			EmailVerified: p.EmailVerified, PreferredLanguage: language.English}
	}
	st := &store{Storage: storage.NewStorageWithClients(users, map[string]*storage.Client{
		ClientID:      storage.DeviceClient(ClientID, ""),
		OtherClientID: storage.DeviceClient(OtherClientID, ""),
	}), groups: map[string][]string{}}
	for _, p := range people {
		st.groups[p.Subject] = p.Groups
	}
	provider, err := op.NewProvider(&op.Config{
		CryptoKey:             sha256.Sum256([]byte(t.Name())),
		CodeMethodS256:        true,
		GrantTypeRefreshToken: true,
		DeviceAuthorization: op.DeviceAuthorizationConfig{
			Lifetime:     5 * time.Minute,
			PollInterval: time.Second,
			UserFormPath: "/device",
			UserCode:     op.UserCodeBase20,
		},
		SupportedUILocales: []language.Tag{language.English},
	}, st, op.StaticIssuer(issuer), op.WithAllowInsecure())
	if err != nil {
		t.Fatal(err)
	}
	p := &IdP{Issuer: issuer, st: st, server: srv,
		callback: provider.AuthorizationEndpoint().Absolute(issuer) + "/callback?id=", people: map[string]Person{}}
	for _, x := range people {
		p.people[x.Subject] = x
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/login/username", p.login)
	mux.Handle("/", provider)
	srv.Config.Handler = p.countKeys(provider.KeysEndpoint().Relative(), mux)
	srv.Start()
	t.Cleanup(srv.Close)
	return p
}

// SignedIn says who the browser that opens the provider's sign-in page is
// signed in as there (its session at the provider): the page then signs
// them in at once and sends the browser back to the application, as a
// provider with a live session does. "" is nobody: the provider sends the
// browser back with an error (interaction_required).
func (p *IdP) SignedIn(subject string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.session = subject
}

// login is the provider's sign-in page (the example storage's login URL).
func (p *IdP) login(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("authRequestID")
	p.mu.Lock()
	subject := p.session
	p.mu.Unlock()
	if subject != "" {
		if err := p.st.CheckUsernamePassword(bySubject+subject, "", id); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
	}
	http.Redirect(w, r, p.callback+url.QueryEscape(id), http.StatusFound)
}

// AllowRedirect registers uri as a redirect of TP's client besides the
// loopback, as an administrator registers TP's website (an https URL) where
// people approve grants by signing in.
func (p *IdP) AllowRedirect(uri string) {
	p.st.mu.Lock()
	defer p.st.mu.Unlock()
	p.st.redirects = append(p.st.redirects, uri)
}

// Approve signs the person with subject in at the provider and approves the
// device authorization with userCode, as the person would on the
// provider's page.
func (p *IdP) Approve(ctx context.Context, userCode, subject string) error {
	return p.st.CompleteDeviceAuthorization(ctx, userCode, subject)
}

// Deny declines the device authorization with userCode.
func (p *IdP) Deny(ctx context.Context, userCode string) error {
	return p.st.DenyDeviceAuthorization(ctx, userCode)
}

// Disable ends a person's sign-ins at the provider, as an administrator who
// disables or removes them there does: their refresh tokens are refused from
// now on (invalid_grant), and the sign-in page no longer signs them in.
func (p *IdP) Disable(subject string) {
	p.st.mu.Lock()
	defer p.st.mu.Unlock()
	if p.st.disabled == nil {
		p.st.disabled = map[string]bool{}
	}
	p.st.disabled[subject] = true
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.session == subject {
		p.session = ""
	}
}

// SetGroups changes the groups the provider gives a person from now on.
func (p *IdP) SetGroups(subject string, groups []string) {
	p.st.mu.Lock()
	defer p.st.mu.Unlock()
	p.st.groups[subject] = groups
}

// store is the example storage, with TP's client as a public client whose ID
// tokens carry the person's claims (as Google's, Okta's and Entra ID's do)
// and a groups claim.
type store struct {
	*storage.Storage
	mu        sync.Mutex
	groups    map[string][]string
	disabled  map[string]bool
	redirects []string // registered besides the loopback (AllowRedirect)
}

// CreateAccessAndRefreshTokens gives a device authorization's refresh token
// its client, as real providers do: the example storage records none for
// it, and refreshing it then fails the client check.
func (s *store) CreateAccessAndRefreshTokens(ctx context.Context, request op.TokenRequest, currentRefreshToken string) (string, string, time.Time, error) {
	if d, ok := request.(*op.DeviceAuthorizationState); ok && currentRefreshToken == "" {
		request = &storage.AuthRequest{ApplicationID: d.ClientID, UserID: d.Subject, Scopes: d.Scopes}
	}
	return s.Storage.CreateAccessAndRefreshTokens(ctx, request, currentRefreshToken)
}

// TokenRequestByRefreshToken refuses a disabled person's refresh tokens.
func (s *store) TokenRequestByRefreshToken(ctx context.Context, refreshToken string) (op.RefreshTokenRequest, error) {
	r, err := s.Storage.TokenRequestByRefreshToken(ctx, refreshToken)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.disabled[r.GetSubject()] {
		return nil, errors.New("the person is disabled at the provider")
	}
	return r, nil
}

func (s *store) GetClientByClientID(ctx context.Context, id string) (op.Client, error) {
	c, err := s.Storage.GetClientByClientID(ctx, id)
	if err != nil {
		return nil, err
	}
	return publicClient{c, s}, nil
}

func (s *store) SetUserinfoFromScopes(ctx context.Context, info *oidc.UserInfo, userID, clientID string, scopes []string) error {
	if err := s.Storage.SetUserinfoFromScopes(ctx, info, userID, clientID, scopes); err != nil {
		return err
	}
	s.mu.Lock()
	groups := s.groups[userID]
	s.mu.Unlock()
	if groups != nil {
		info.AppendClaims("groups", groups)
	}
	return nil
}

// publicClient is a client without a secret that may use the device grant.
type publicClient struct {
	op.Client
	st *store
}

func (publicClient) AuthMethod() oidc.AuthMethod         { return oidc.AuthMethodNone }
func (publicClient) ApplicationType() op.ApplicationType { return op.ApplicationTypeNative }
func (publicClient) GrantTypes() []oidc.GrantType {
	return []oidc.GrantType{oidc.GrantTypeDeviceCode, oidc.GrantTypeCode, oidc.GrantTypeRefreshToken}
}

// RedirectURIs is the loopback redirect of a native application, any port
// (RFC 8252, section 7.3), and those registered with AllowRedirect.
func (c publicClient) RedirectURIs() []string {
	c.st.mu.Lock()
	defer c.st.mu.Unlock()
	return append([]string{"http://127.0.0.1/callback"}, c.st.redirects...)
}
func (publicClient) ResponseTypes() []oidc.ResponseType {
	return []oidc.ResponseType{oidc.ResponseTypeCode}
}
func (publicClient) IDTokenUserinfoClaimsAssertion() bool { return true }
func (publicClient) IDTokenLifetime() time.Duration       { return 10 * time.Minute }

// userStore is the people a provider knows, by subject.
type userStore map[string]*storage.User

func (u userStore) GetUserByID(id string) *storage.User { return u[id] }

// bySubject prefixes a subject given to the storage's login check as a user
// name: the provider's page signs a person in by subject.
const bySubject = "\x00subject:"

func (u userStore) GetUserByUsername(name string) *storage.User {
	if sub, ok := strings.CutPrefix(name, bySubject); ok {
		return u[sub]
	}
	for _, p := range u {
		if strings.EqualFold(p.Username, name) {
			return p
		}
	}
	return nil
}
func (userStore) ExampleClientID() string { return "service" }

var _ http.Handler = (*op.Provider)(nil)
