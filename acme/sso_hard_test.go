package acme

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testidp"
)

// signInMany runs n sign-ins of the person with subject at once and
// returns their ID tokens.
func signInMany(t *testing.T, idp *testidp.IdP, subject string, n int) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	info := login.SSOInfo{Issuer: idp.Issuer, ClientID: testidp.ClientID, Scopes: []string{"openid", "email", "profile"}}
	toks := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			var approveErr error
			id, err := login.SignIn(ctx, http.DefaultClient, info, func(c login.DeviceCode) {
				approveErr = idp.Approve(ctx, c.Code, subject)
			})
			errs[i] = errors.Join(approveErr, err)
			if err == nil {
				toks[i] = id.IDToken
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return toks
}

// The bad input: eight sign-ins of one person that enrol the same new
// device name at the same moment, each with its own key. Exactly one
// enrols; the others get 409 saying the device is already enrolled, and the
// stored key is the winner's.
func TestSSOConcurrentSameDevice(t *testing.T) {
	t.Parallel()
	ts, idp := ssoServer(t)
	ctx := context.Background()
	const n = 8
	toks := signInMany(t, idp, ssoAlice.Subject, n)
	errs := make([]error, n)
	keys := make([][]byte, n)
	var wg sync.WaitGroup
	for i := range n {
		key := newKey(t)
		der, err := x509.MarshalPKIXPublicKey(key.Public())
		if err != nil {
			t.Fatal(err)
		}
		keys[i] = der
		wg.Go(func() { _, errs[i] = login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, toks[i], "laptop", key) })
	}
	wg.Wait()
	winner := -1
	for i, err := range errs {
		var se *login.ServerError
		switch {
		case err == nil && winner >= 0:
			t.Fatalf("sign-ins %d and %d both enrolled alice@laptop", winner, i)
		case err == nil:
			winner = i
		case !errors.As(err, &se) || se.Status != http.StatusConflict || !strings.Contains(se.Message, `device "alice@laptop" is already enrolled`):
			t.Fatalf("sign-in %d: %v; want 409 saying alice@laptop is already enrolled", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no sign-in enrolled alice@laptop")
	}
	if dev, err := ts.Users.Device("alice@laptop"); err != nil || !bytes.Equal(dev.PublicKey, keys[winner]) {
		t.Fatalf("alice@laptop holds %x (%v); want the key of sign-in %d", dev.PublicKey, err, winner)
	}
}

// A user's devices enrolled by sign-in are bounded (sso-max-devices). The
// bad input: one more past the bound, refused with what the person can do.
// A device revoked on the deny list (tpd revoke --device) or in the store
// does not count.
func TestSSOMaxDevices(t *testing.T) {
	t.Parallel()
	ts, idp := ssoServer(t)
	ts.Enroller.SSO.MaxDevices = 2
	var mu sync.Mutex
	denied := map[string]bool{}
	ts.Enroller.Denied = func(dev users.Device) (string, bool) {
		mu.Lock()
		defer mu.Unlock()
		return "device " + dev.ID + " is revoked", denied[dev.ID]
	}
	ctx := context.Background()
	toks := signInMany(t, idp, ssoAlice.Subject, 5)
	for i, name := range []string{"one", "two"} {
		if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, toks[i], name, newKey(t)); err != nil {
			t.Fatal(err)
		}
	}
	_, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, toks[2], "three", newKey(t))
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusForbidden ||
		!strings.Contains(se.Message, "alice already has 2 devices enrolled by sign-in, the most this server allows") ||
		!strings.Contains(se.Message, "tpd revoke --device alice@NAME") {
		t.Fatalf("a third device with sso-max-devices 2: %v; want 403 saying so and how to revoke one", err)
	}
	if _, err := ts.Users.Device("alice@three"); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("alice@three after the refusal: %v; want it absent", err)
	}
	mu.Lock()
	denied["alice@one"] = true
	mu.Unlock()
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, toks[3], "three", newKey(t)); err != nil {
		t.Fatalf("a third device once one is on the deny list: %v", err)
	}
	if err := ts.Users.RevokeDevice("alice@two"); err != nil {
		t.Fatal(err)
	}
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, toks[4], "four", newKey(t)); err != nil {
		t.Fatalf("a fourth device once another is revoked: %v", err)
	}
}

// The bad input: tokens signed with the provider's own key whose JOSE typ
// says they are not ID tokens: an access token in JWT form (RFC 9068) or a
// logout token. They are refused before anything else (the provider's
// keys are not even fetched); an ID token's typ, JWT in any case or
// absent, is taken.
func TestSSOTokenType(t *testing.T) {
	t.Parallel()
	ts, idp := ssoServer(t)
	ctx := context.Background()
	for _, typ := range []string{"at+jwt", "AT+JWT", "application/at+jwt", "logout+jwt", "secevent+jwt", "JOSE"} {
		_, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, idp.Mint(t, ssoAlice.Subject, typ, ""), "laptop", newKey(t))
		var se *login.ServerError
		if !errors.As(err, &se) || se.Status != http.StatusForbidden || !strings.Contains(se.Message, fmt.Sprintf("is not an ID token (its type is %q", typ)) {
			t.Fatalf("a token of typ %q: %v; want 403 saying it is not an ID token", typ, err)
		}
	}
	if n := idp.KeyFetches(); n != 0 {
		t.Fatalf("the refused tokens made tpd fetch the provider's keys %d times; want none", n)
	}
	if _, err := ts.Users.Device("alice@laptop"); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("alice@laptop after the refused tokens: %v; want it absent", err)
	}
	for i, typ := range []string{"JWT", "jwt", ""} {
		if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, idp.Mint(t, ssoAlice.Subject, typ, ""), fmt.Sprintf("dev%d", i), newKey(t)); err != nil {
			t.Fatalf("an ID token of typ %q: %v", typ, err)
		}
	}
}

// The bad input: 200 forged tokens, each naming a key ID the provider does
// not have, sent by 8 clients at once, twice: tpd fetches the provider's
// keys again at most once per 10 s (on its clock, frozen here, so the
// count does not hang on timing), and refuses each token saying the key is
// unknown. The provider's count of served key sets is what is checked.
func TestSSOUnknownKeyIDsBounded(t *testing.T) {
	t.Parallel()
	ts, idp := ssoServer(t)
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	ts.Enroller.SSO.clock = func() time.Time { return time.Unix(0, clock.Load()) }
	ctx := context.Background()
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, idp.Mint(t, ssoAlice.Subject, "", ""), "laptop", newKey(t)); err != nil {
		t.Fatal(err)
	}
	if n := idp.KeyFetches(); n != 1 {
		t.Fatalf("one sign-in fetched the keys %d times; want 1", n)
	}
	flood := func() {
		t.Helper()
		toks := make(chan string, 200)
		for range 200 {
			kid := make([]byte, 8)
			_, _ = rand.Read(kid)
			toks <- idp.Mint(t, ssoAlice.Subject, "", fmt.Sprintf("%x", kid))
		}
		close(toks)
		var wg sync.WaitGroup
		var bad atomic.Int64
		for range 8 {
			key := newKey(t)
			wg.Go(func() {
				for tok := range toks {
					_, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, tok, "forged", key)
					var se *login.ServerError
					if !errors.As(err, &se) || se.Status != http.StatusForbidden || !strings.Contains(se.Message, "the provider publishes no key with its key ID") {
						if bad.Add(1) == 1 {
							t.Errorf("a token with an unknown key ID: %v; want 403 saying the provider publishes no such key", err)
						}
					}
				}
			})
		}
		wg.Wait()
	}
	flood()
	if n := idp.KeyFetches(); n != 1 {
		t.Fatalf("200 forged tokens within 10 s of the last fetch fetched the keys %d times in all; want no more than the first", n)
	}
	clock.Add(int64(11 * time.Second))
	flood()
	if n := idp.KeyFetches(); n != 2 {
		t.Fatalf("200 forged tokens 11 s after the last fetch fetched the keys %d times in all; want one more", n)
	}
	if _, err := ts.Users.Device("alice@forged"); !errors.Is(err, users.ErrNotFound) {
		t.Fatalf("alice@forged: %v; want it absent", err)
	}
}

// tokenType reads the typ of a JOSE header from untrusted bytes: it never
// panics, and says "JWT" only for a header whose typ is that string.
func FuzzTokenType(f *testing.F) {
	for _, h := range []string{`{"alg":"RS256","typ":"JWT"}`, `{"alg":"RS256","typ":"at+jwt"}`, `{"alg":"RS256"}`,
		`{"typ":null}`, `{"typ":1}`, `{"typ":"at+jwt","typ":"JWT"}`, `not json`, ``} {
		f.Add(base64.RawURLEncoding.EncodeToString([]byte(h)) + ".e30.sig")
	}
	f.Add("no dots at all")
	f.Fuzz(func(t *testing.T, raw string) {
		typ, ok := tokenType(raw)
		if !ok && typ != "" {
			t.Fatalf("tokenType(%q) = %q without a typ", raw, typ)
		}
	})
}

// The typ values an ID token may have, and the ones refused (the bad
// inputs: null, a number, another type).
func TestTokenType(t *testing.T) {
	for _, c := range []struct {
		header  string
		typ     string
		present bool
	}{
		{`{"alg":"RS256","typ":"JWT"}`, "JWT", true},
		{`{"alg":"RS256"}`, "", false},
		{`{"typ":"at+jwt"}`, "at+jwt", true},
		{`{"typ":null}`, "<nil>", true},
		{`{"typ":1}`, "1", true},
	} {
		typ, ok := tokenType(base64.RawURLEncoding.EncodeToString([]byte(c.header)) + ".e30.sig")
		if typ != c.typ || ok != c.present {
			t.Errorf("header %s: typ %q, %t; want %q, %t", c.header, typ, ok, c.typ, c.present)
		}
	}
}

// The bad input: a provider whose discovery answers but whose keys do not
// (503). Sign-ins get 503 saying the provider cannot be reached, and the
// failed fetch counts against the bound like any other: tpd asks for the
// keys again only 10 s later (its clock, frozen here), however many
// sign-ins come meanwhile.
func TestSSOKeysUnreachableBounded(t *testing.T) {
	t.Parallel()
	var keyFetches atomic.Int64
	mux := http.NewServeMux()
	provider := httptest.NewServer(mux)
	t.Cleanup(provider.Close)
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"issuer":%q,"authorization_endpoint":"%[1]s/auth","token_endpoint":"%[1]s/token","jwks_uri":"%[1]s/keys","id_token_signing_alg_values_supported":["RS256"]}`, provider.URL)
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, _ *http.Request) {
		keyFetches.Add(1)
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
	})
	ts := newTestServer(t)
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	ts.Enroller.SSO = &SSO{Issuer: provider.URL, ClientID: testidp.ClientID, Domain: "example.org",
		clock: func() time.Time { return time.Unix(0, clock.Load()) }}
	// A token with the claims the verifier checks before the signature; the
	// signature is never reached.
	seg := func(v string) string { return base64.RawURLEncoding.EncodeToString([]byte(v)) }
	now := time.Now().Unix()
	tok := seg(`{"alg":"RS256","kid":"k1"}`) + "." +
		seg(fmt.Sprintf(`{"iss":%q,"aud":%q,"sub":"s-alice","iat":%d,"exp":%d,"email":"alice@example.org","email_verified":true}`, provider.URL, testidp.ClientID, now, now+600)) +
		"." + seg("not a signature")
	ctx := context.Background()
	try := func(n int) {
		t.Helper()
		for range n {
			_, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, tok, "laptop", newKey(t))
			var se *login.ServerError
			if !errors.As(err, &se) || se.Status != http.StatusServiceUnavailable || !strings.Contains(se.Message, "cannot reach the identity provider") {
				t.Fatalf("a sign-in while the provider's keys answer 503: %v; want 503 saying the provider cannot be reached", err)
			}
		}
	}
	try(5)
	if n := keyFetches.Load(); n != 1 {
		t.Fatalf("5 sign-ins while the keys fail fetched them %d times; want once", n)
	}
	clock.Add(int64(11 * time.Second))
	try(5)
	if n := keyFetches.Load(); n != 2 {
		t.Fatalf("5 more sign-ins 11 s later fetched the keys %d times in all; want 2", n)
	}
}
