package acme

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testidp"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// People at the test provider.
var (
	ssoAlice = testidp.Person{Subject: "s-alice", Email: "Alice@Example.org", EmailVerified: true, Username: "alice",
		Groups: []string{"Ops", "dev team", "admins"}}
	ssoCarol = testidp.Person{Subject: "s-carol", Email: "carol@other.org", EmailVerified: true}
	ssoBob   = testidp.Person{Subject: "s-bob", Email: "bob@example.org", EmailVerified: false}
	ssoOdd   = testidp.Person{Subject: "s-odd", Email: "o'neil@example.org", EmailVerified: true}
	// U+212A KELVIN SIGN: Unicode lowercasing would make it kevin.
	ssoKelvin = testidp.Person{Subject: "s-kelvin", Email: "\u212Aevin@example.org", EmailVerified: true}
)

// ssoServer is a test server whose enrollment endpoints sign people in with
// a real OpenID Connect provider on loopback.
func ssoServer(t *testing.T) (*testServer, *testidp.IdP) {
	t.Helper()
	idp := testidp.Start(t, ssoAlice, ssoCarol, ssoBob, ssoOdd, ssoKelvin)
	ts := newTestServer(t)
	ts.Enroller.SSO = &SSO{Issuer: idp.Issuer, ClientID: testidp.ClientID, Domain: "example.org"}
	return ts, idp
}

// signIn runs dlogin's side of a sign-in for client, the person with
// subject approving it at the provider; it returns the ID token.
func signIn(t *testing.T, idp *testidp.IdP, clientID, subject string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	info := login.SSOInfo{Issuer: idp.Issuer, ClientID: clientID, Scopes: []string{"openid", "email", "profile"}}
	var approveErr error
	id, err := login.SignIn(ctx, http.DefaultClient, info, func(c login.DeviceCode) {
		if c.URL == "" || c.Code == "" {
			approveErr = errors.New("the provider gave no page or code to show")
			return
		}
		approveErr = idp.Approve(ctx, c.Code, subject)
	})
	if approveErr != nil {
		t.Fatal(approveErr)
	}
	if err != nil {
		t.Fatal(err)
	}
	return id.IDToken
}

// A person signs in at the organisation's provider and enrols a device with
// the ID token: the device is theirs (the email's local part, lowercased),
// their groups come from the provider's claims (lowercased; a name TP cannot
// use is left out and named), and the device then logs in as any enrolled
// device does. Signing in again replaces the groups.
func TestSSOEnrollAndLogin(t *testing.T) {
	t.Parallel()
	ts, idp := ssoServer(t)
	ctx := context.Background()

	info, err := login.FetchSSO(ctx, ts.HC, ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	if info.Issuer != idp.Issuer || info.ClientID != testidp.ClientID || !slices.Contains(info.Scopes, "openid") {
		t.Fatalf("the server's SSO info %+v; want the provider %s and client %s", info, idp.Issuer, testidp.ClientID)
	}
	devKey := newKey(t)
	got, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, info.ClientID, ssoAlice.Subject), "laptop", devKey)
	if err != nil {
		t.Fatal(err)
	}
	if got.DeviceID != "alice@laptop" || !slices.Equal(got.Groups, []string{"admins", "ops"}) || !slices.Equal(got.Ignored, []string{"dev team"}) {
		t.Fatalf("enrolled %+v; want alice@laptop in groups admins and ops, with \"dev team\" left out", got)
	}
	creds, err := login.Login(ctx, ts.HC, ts.URL, got.DeviceID, devKey, nil)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := authz.IdentityFromCert(creds.Chain[0]); err != nil || id.DeviceID != "alice@laptop" {
		t.Fatalf("the certificate names %+v (%v); want alice@laptop", id, err)
	}
	who, err := login.Whoami(ctx, ts.HC, ts.URL, "alice@laptop", devKey)
	if err != nil || !slices.Equal(who.Groups, []string{"admins", "ops"}) {
		t.Fatalf("whoami: %+v, %v; want groups admins and ops", who, err)
	}

	// The provider's groups change; the next sign-in brings them.
	idp.SetGroups(ssoAlice.Subject, []string{"ops"})
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, info.ClientID, ssoAlice.Subject), "desktop", newKey(t)); err != nil {
		t.Fatal(err)
	}
	who, err = login.Whoami(ctx, ts.HC, ts.URL, "alice@laptop", devKey)
	if err != nil || !slices.Equal(who.Groups, []string{"ops"}) {
		t.Fatalf("whoami after the provider dropped admins: %+v, %v; want group ops only", who, err)
	}

	// A sign-in enrols new devices only: one for alice@laptop again (another
	// machine of the same name, or someone who got hold of a sign-in) is
	// refused, and the enrolled laptop's key still works.
	_, err = login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, info.ClientID, ssoAlice.Subject), "laptop", newKey(t))
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusConflict || !strings.Contains(se.Message, `device "alice@laptop" is already enrolled`) {
		t.Fatalf("a sign-in for the enrolled alice@laptop: %v; want 409 saying it is already enrolled", err)
	}
	if _, err := login.Whoami(ctx, ts.HC, ts.URL, "alice@laptop", devKey); err != nil {
		t.Fatalf("the laptop's own key after the refused sign-in: %v", err)
	}
}

// Each bad sign-in is refused with a sentence that says why, and enrols
// nothing.
func TestSSORefusals(t *testing.T) {
	t.Parallel()
	ts, idp := ssoServer(t)
	ctx := context.Background()
	enrol := func(t *testing.T, idToken, device string) error {
		t.Helper()
		_, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, idToken, device, newKey(t))
		return err
	}
	refused := func(t *testing.T, err error, status int, want string) {
		t.Helper()
		var se *login.ServerError
		if !errors.As(err, &se) || se.Status != status || !strings.Contains(se.Message, want) {
			t.Fatalf("got %v; want a %d refusal saying %q", err, status, want)
		}
	}

	t.Run("an ID token used twice", func(t *testing.T) {
		tok := signIn(t, idp, testidp.ClientID, ssoAlice.Subject)
		if err := enrol(t, tok, "first"); err != nil {
			t.Fatal(err)
		}
		refused(t, enrol(t, tok, "second"), http.StatusForbidden, "already enrolled a device")
	})
	t.Run("an email domain not allowed", func(t *testing.T) {
		refused(t, enrol(t, signIn(t, idp, testidp.ClientID, ssoCarol.Subject), "laptop"), http.StatusForbidden, `people of "other.org" may not enrol`)
	})
	t.Run("an email the provider has not verified", func(t *testing.T) {
		refused(t, enrol(t, signIn(t, idp, testidp.ClientID, ssoBob.Subject), "laptop"), http.StatusForbidden, "has not verified the email address bob@example.org")
	})
	t.Run("an email that is not ASCII", func(t *testing.T) {
		refused(t, enrol(t, signIn(t, idp, testidp.ClientID, ssoKelvin.Subject), "laptop"), http.StatusForbidden, "is not plain ASCII")
	})
	t.Run("an email that is no TP user name", func(t *testing.T) {
		refused(t, enrol(t, signIn(t, idp, testidp.ClientID, ssoOdd.Subject), "laptop"), http.StatusForbidden, "does not give a valid TP user name")
	})
	t.Run("an ID token issued to another application", func(t *testing.T) {
		refused(t, enrol(t, signIn(t, idp, testidp.OtherClientID, ssoAlice.Subject), "laptop"), http.StatusForbidden, "not one this server accepts")
	})
	t.Run("an ID token whose signature was changed", func(t *testing.T) {
		tok := signIn(t, idp, testidp.ClientID, ssoAlice.Subject)
		b := []byte(tok)
		b[len(b)-5] ^= 'A' ^ 'B'
		if b[len(b)-5] == tok[len(tok)-5] {
			t.Fatal("the signature did not change")
		}
		refused(t, enrol(t, string(b), "laptop"), http.StatusForbidden, "not one this server accepts")
	})
	t.Run("a request signed by another key than the one it registers", func(t *testing.T) {
		tok := signIn(t, idp, testidp.ClientID, ssoAlice.Subject)
		key, other := newKey(t), newKey(t)
		pub := encodePub(t, key)
		sig, err := login.SignMessage(other, login.EnrollSSOMessage(tok, "laptop", pub))
		if err != nil {
			t.Fatal(err)
		}
		var out login.EnrollSSOResponse
		err = postForTest(ctx, ts, login.PathEnrollSSO, login.EnrollSSORequest{IDToken: tok, Device: "laptop", PublicKey: pub, Signature: sig}, &out)
		refused(t, err, http.StatusBadRequest, "signature does not match")
	})
	t.Run("a device name TP cannot use", func(t *testing.T) {
		refused(t, enrol(t, signIn(t, idp, testidp.ClientID, ssoAlice.Subject), "My Laptop"), http.StatusBadRequest, `device name "My Laptop"`)
	})
	t.Run("a revoked device", func(t *testing.T) {
		if err := enrol(t, signIn(t, idp, testidp.ClientID, ssoAlice.Subject), "stolen"); err != nil {
			t.Fatal(err)
		}
		if err := ts.Users.RevokeDevice("alice@stolen"); err != nil {
			t.Fatal(err)
		}
		refused(t, enrol(t, signIn(t, idp, testidp.ClientID, ssoAlice.Subject), "stolen"), http.StatusForbidden, "has been revoked")
		if dev, err := ts.Users.Device("alice@stolen"); err != nil || !dev.Revoked {
			t.Fatalf("alice@stolen after the refused sign-in: %+v, %v; want it still revoked", dev, err)
		}
	})
}

// A sign-in older than ten minutes enrols nothing (a leaked ID token is
// worth little), and a server without a provider says how to enrol instead.
func TestSSOStaleAndAbsent(t *testing.T) {
	t.Parallel()
	ts, idp := ssoServer(t)
	ctx := context.Background()
	tok := signIn(t, idp, testidp.ClientID, ssoAlice.Subject)
	ts.Enroller.Now = func() time.Time { return time.Now().Add(ssoMaxAge + time.Minute) }
	_, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, tok, "laptop", newKey(t))
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusForbidden || !strings.Contains(se.Message, "older than 10m0s") {
		t.Fatalf("a sign-in 11 minutes old: %v; want a refusal saying it is older than 10 minutes", err)
	}

	plain := newTestServer(t)
	if _, err := login.FetchSSO(ctx, plain.HC, plain.URL); !errors.Is(err, login.ErrNoSSO) || !strings.Contains(err.Error(), "tpd enroll USER --device NAME") {
		t.Fatalf("a server without a provider: %v; want ErrNoSSO naming tpd enroll", err)
	}
}

// A provider tpd cannot reach is the server's trouble, not the person's:
// 503 with Retry-After, and nothing enrolled.
func TestSSOProviderUnreachable(t *testing.T) {
	t.Parallel()
	ts, idp := ssoServer(t)
	tok := signIn(t, idp, testidp.ClientID, ssoAlice.Subject)
	ts.Enroller.SSO = &SSO{Issuer: "http://" + testnet.Refusing(t), ClientID: testidp.ClientID, Domain: "example.org"}
	_, err := login.EnrollDeviceSSO(context.Background(), ts.HC, ts.URL, tok, "laptop", newKey(t))
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusServiceUnavailable || !strings.Contains(se.Message, "cannot reach the identity provider") {
		t.Fatalf("a provider that refuses connections: %v; want 503 saying the server cannot reach it", err)
	}
	if _, err := ts.Users.Device("alice@laptop"); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("alice@laptop exists after a refused sign-in (%v)", err)
	}

	// A provider that answers with errors: tpd asks it once, not once per
	// request (anyone can send one), until ssoRetry passed.
	var asked atomic.Int64
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		asked.Add(1)
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
	}))
	t.Cleanup(broken.Close)
	ts.Enroller.SSO = &SSO{Issuer: broken.URL, ClientID: testidp.ClientID, Domain: "example.org"}
	for i := range 3 {
		_, err := login.EnrollDeviceSSO(context.Background(), ts.HC, ts.URL, tok, "laptop", newKey(t))
		if !errors.As(err, &se) || se.Status != http.StatusServiceUnavailable {
			t.Fatalf("request %d to a provider that answers 503: %v; want 503", i, err)
		}
	}
	if n := asked.Load(); n != 1 {
		t.Fatalf("3 requests asked the failing provider %d times; want once", n)
	}
}

// The scopes tpd is configured with are the ones /tp/v1/sso tells dlogin to
// ask for (sso-scopes: Dex and Okta put groups in the ID token only for a
// groups scope); without any, openid, email and profile.
func TestSSOInfoScopes(t *testing.T) {
	t.Parallel()
	ts, _ := ssoServer(t)
	info, err := login.FetchSSO(context.Background(), ts.HC, ts.URL)
	if err != nil || !slices.Equal(info.Scopes, []string{"openid", "email", "profile"}) {
		t.Fatalf("default scopes: %+v, %v", info, err)
	}
	ts.Enroller.SSO.Scopes = []string{"openid", "email", "groups"}
	info, err = login.FetchSSO(context.Background(), ts.HC, ts.URL)
	if err != nil || !slices.Equal(info.Scopes, []string{"openid", "email", "groups"}) {
		t.Fatalf("configured scopes: %+v, %v; want openid email groups", info, err)
	}
}

// failingUsed is a shared used-token store that cannot be reached (the
// database is down).
type failingUsed struct{}

func (failingUsed) UseOnce(context.Context, string, time.Time) (bool, error) {
	return false, errors.New("dial tcp 127.0.0.1:5432: connect: connection refused")
}

// The bad input: a valid sign-in while the shared store of used ID tokens is
// unreachable. It fails closed: 503 with a sentence that says nothing was
// enrolled and when to try again, and no device.
func TestSSOUsedStoreDown(t *testing.T) {
	t.Parallel()
	ts, idp := ssoServer(t)
	ts.Enroller.SSO.Used = failingUsed{}
	tok := signIn(t, idp, testidp.ClientID, ssoAlice.Subject)
	_, err := login.EnrollDeviceSSO(context.Background(), ts.HC, ts.URL, tok, "laptop", newKey(t))
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusServiceUnavailable ||
		se.Message != "the server cannot reach its database right now, so nothing was enrolled; run dlogin --sso again in a minute" {
		t.Fatalf("a sign-in while the used-token store is down: %v; want 503 saying nothing was enrolled", err)
	}
	if _, err := ts.Users.Device("alice@laptop"); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("alice@laptop exists after a sign-in the store could not record (%v)", err)
	}
}

// A sign-in declined at the provider ends dlogin's wait with a sentence.
func TestSSODeclined(t *testing.T) {
	t.Parallel()
	idp := testidp.Start(t, ssoAlice)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	info := login.SSOInfo{Issuer: idp.Issuer, ClientID: testidp.ClientID, Scopes: []string{"openid", "email"}}
	_, err := login.SignIn(ctx, http.DefaultClient, info, func(c login.DeviceCode) { _ = idp.Deny(ctx, c.Code) })
	if err == nil || !strings.Contains(err.Error(), "declined at the identity provider") {
		t.Fatalf("a declined sign-in: %v; want a sentence saying it was declined", err)
	}
}

// encodePub is key's public half as the enrollment requests carry it.
func encodePub(t *testing.T, key *ecdsa.PrivateKey) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(der)
}

// postForTest posts in to the test server's path as dlogin would, reading
// a refusal into a *login.ServerError.
func postForTest(ctx context.Context, ts *testServer, path string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, ts.URL+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := ts.HC.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		var e login.ErrorResponse
		_ = json.Unmarshal(body, &e)
		return &login.ServerError{Status: resp.StatusCode, Message: e.Error}
	}
	return json.Unmarshal(body, out)
}

// The claims a sign-in needs, case by case (the bad input named in each).
func TestSSOClaims(t *testing.T) {
	s := &SSO{ClientID: "tp", Domain: "example.org"}
	base := func() map[string]any {
		return map[string]any{"aud": "tp", "email": "alice@example.org", "email_verified": true}
	}
	for _, c := range []struct {
		name   string
		change func(map[string]any)
		want   string // refusal; "" accepts
		groups []string
	}{
		{"no groups claim: groups stay", func(map[string]any) {}, "", nil},
		{"an empty groups claim: groups cleared", func(m map[string]any) { m["groups"] = []any{} }, "", []string{}},
		{"one group as a string", func(m map[string]any) { m["groups"] = "Ops" }, "", []string{"ops"}},
		{"a Unicode group left out", func(m map[string]any) { m["groups"] = []any{"ops", "\u212Aitchen"} }, "", []string{"ops"}},
		{"email_verified as the string true", func(m map[string]any) { m["email_verified"] = "true" }, "", nil},
		{"email_verified missing", func(m map[string]any) { delete(m, "email_verified") }, "has not verified", nil},
		{"a token another application asked for (azp)", func(m map[string]any) { m["azp"] = "other-app" }, `issued to "other-app"`, nil},
		{"several audiences without azp", func(m map[string]any) { m["aud"] = []any{"tp", "other-app"} }, "several audiences", nil},
		{"several audiences, azp TP", func(m map[string]any) { m["aud"] = []any{"tp", "other-app"}; m["azp"] = "tp" }, "", nil},
		{"a domain that only folds to the allowed one", func(m map[string]any) { m["email"] = "alice@exampleſ.org" }, "not plain ASCII", nil},
		{"a sub-domain", func(m map[string]any) { m["email"] = "alice@mail.example.org" }, `people of "mail.example.org"`, nil},
		{"no email", func(m map[string]any) { delete(m, "email") }, "no email address", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := base()
			c.change(m)
			p, err := s.person(m)
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("claims %v refused: %v", m, err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Fatalf("claims %v: %v; want a refusal saying %q", m, err, c.want)
			case c.want == "" && (p.User != "alice" || !slices.Equal(p.Groups, c.groups) || (p.Groups == nil) != (c.groups == nil)):
				t.Fatalf("claims %v gave user %q groups %#v; want alice, %#v", m, p.User, p.Groups, c.groups)
			}
		})
	}
}
