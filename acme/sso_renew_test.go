package acme

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/testkit/testidp"
)

// With sso-renew: sign-in, a device enrolled by single sign-on renews only
// with a fresh sign-in of the person who enrolled it, and each brings the
// provider's groups. The bad inputs: a login with no sign-in (answered with
// CodeSignIn, no certificate); a sign-in of another account at the provider
// that has alice's address now (the address was given to someone else);
// a token enrolled device, which renews with its key as before.
func TestSSORenewWithSignIn(t *testing.T) {
	t.Parallel()
	newAlice := testidp.Person{Subject: "s-alice-new", Email: "alice@example.org", EmailVerified: true}
	idp := testidp.Start(t, ssoAlice, newAlice)
	ts := newTestServer(t)
	ts.Enroller.SSO = &SSO{Issuer: idp.Issuer, ClientID: testidp.ClientID, Domain: "example.org", RenewWithSignIn: true, KeepRefresh: true}
	ctx := context.Background()

	info, err := login.FetchSSO(ctx, ts.HC, ts.URL)
	if err != nil || info.Renew != login.RenewSignIn || !info.KeepRefresh || !slices.Contains(info.Scopes, "offline_access") {
		t.Fatalf("the server's SSO info %+v (%v); want renewals by sign-in, refresh tokens kept and offline_access asked for", info, err)
	}
	devKey := newKey(t)
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, testidp.ClientID, ssoAlice.Subject), "laptop", devKey); err != nil {
		t.Fatal(err)
	}
	if dev, err := ts.Users.Device("alice@laptop"); err != nil || dev.SSOSubject != ssoAlice.Subject {
		t.Fatalf("alice@laptop: %+v, %v; want it bound to the provider's subject %s", dev, err, ssoAlice.Subject)
	}

	_, err = login.Login(ctx, ts.HC, ts.URL, "alice@laptop", devKey, nil)
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusUnauthorized || se.Code != login.CodeSignIn || !strings.Contains(se.Message, "run dlogin to sign in") {
		t.Fatalf("a login without a sign-in: %v; want 401 %s saying to run dlogin", err, login.CodeSignIn)
	}

	idp.SetGroups(ssoAlice.Subject, []string{"ops"})
	asked := 0
	creds, err := login.LoginSignedIn(ctx, ts.HC, ts.URL, "alice@laptop", devKey, nil, func(context.Context, *login.ServerError) (string, error) {
		asked++
		return signIn(t, idp, testidp.ClientID, ssoAlice.Subject), nil
	})
	if err != nil || asked != 1 || len(creds.Chain) == 0 {
		t.Fatalf("a login with alice's fresh sign-in: %v (asked %d times)", err, asked)
	}
	if groups, err := ts.Users.Lookup("alice@laptop"); err != nil || !slices.Equal(groups, []string{"ops"}) {
		t.Fatalf("alice's groups after the renewal: %v, %v; want the provider's: ops", groups, err)
	}

	_, err = login.LoginSignedIn(ctx, ts.HC, ts.URL, "alice@laptop", devKey, nil, func(context.Context, *login.ServerError) (string, error) {
		return signIn(t, idp, testidp.ClientID, newAlice.Subject), nil
	})
	if !errors.As(err, &se) || se.Status != http.StatusForbidden || se.Code != login.CodeSignIn || !strings.Contains(se.Message, "another account") {
		t.Fatalf("a login with the sign-in of another account with alice's address: %v; want 403 saying it is another account", err)
	}

	bobKey := newKey(t)
	en, err := ts.Users.Enroll("bob", "pc", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := login.EnrollDevice(ctx, ts.HC, ts.URL, en.Token, bobKey); err != nil {
		t.Fatal(err)
	}
	if _, err := login.Login(ctx, ts.HC, ts.URL, "bob@pc", bobKey, nil); err != nil {
		t.Fatalf("a device enrolled with a token, on a server that renews sign-ins: %v; want its key to renew it", err)
	}
}

// A sign-in takes the person minutes, longer than the server's 5-minute
// window for a signed request's time: the request after it is signed anew
// (the bad input was the first one's time, sent again). With sso-groups-required,
// a sign-in whose token has no groups claim clears the user's groups (some
// providers leave it out for people with none). A name an enrollment
// reserved but never gave a key is taken by a sign-in, not refused as
// enrolled.
func TestSSORenewSlowSignInAndGroups(t *testing.T) {
	t.Parallel()
	idp := testidp.Start(t, ssoAlice)
	ts := newTestServer(t)
	ts.Enroller.SSO = &SSO{Issuer: idp.Issuer, ClientID: testidp.ClientID, Domain: "example.org", RenewWithSignIn: true, KeepRefresh: true}
	ctx := context.Background()

	if _, err := ts.Users.Enroll("alice", "laptop", nil, time.Hour); err != nil { // reserved, never redeemed
		t.Fatal(err)
	}
	devKey := newKey(t)
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, testidp.ClientID, ssoAlice.Subject), "laptop", devKey); err != nil {
		t.Fatalf("a sign-in for a name reserved but never enrolled: %v; want it enrolled", err)
	}

	// The client's requests are recorded: the one after the sign-in must
	// carry a time of its own, signed then, not the first one's.
	var mu sync.Mutex
	var times []string
	hc := &http.Client{Timeout: ts.HC.Timeout, Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.URL.Path == login.PathAttest {
			body, _ := io.ReadAll(r.Body)
			var req login.AttestRequest
			_ = json.Unmarshal(body, &req)
			mu.Lock()
			times = append(times, req.Time)
			mu.Unlock()
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		return ts.HC.Transport.RoundTrip(r)
	})}
	_, err := login.LoginSignedIn(ctx, hc, ts.URL, "alice@laptop", devKey, nil, func(context.Context, *login.ServerError) (string, error) {
		tok := signIn(t, idp, testidp.ClientID, ssoAlice.Subject)
		for second := time.Now().UTC().Format(time.RFC3339); time.Now().UTC().Format(time.RFC3339) == second; {
			time.Sleep(10 * time.Millisecond) // the sign-in lasts into the next second, as a person's does
		}
		return tok, nil
	})
	if err != nil {
		t.Fatalf("a login with a sign-in: %v", err)
	}
	if len(times) != 2 || times[0] == times[1] {
		t.Fatalf("the login's requests carried the times %q; want two, the second signed after the sign-in", times)
	}

	idp.SetGroups(ssoAlice.Subject, nil) // the provider leaves the claim out
	renew := func() {
		t.Helper()
		if _, err := login.LoginSignedIn(ctx, ts.HC, ts.URL, "alice@laptop", devKey, nil, func(context.Context, *login.ServerError) (string, error) {
			return signIn(t, idp, testidp.ClientID, ssoAlice.Subject), nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	renew()
	if g, _ := ts.Users.Lookup("alice@laptop"); len(g) == 0 {
		t.Fatalf("a token without the groups claim cleared alice's groups without sso-groups-required")
	}
	ts.Enroller.SSO.GroupsRequired = true
	renew()
	if g, err := ts.Users.Lookup("alice@laptop"); err != nil || len(g) != 0 {
		t.Fatalf("with sso-groups-required, a token without the groups claim left groups %v (%v); want none", g, err)
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// A TP user is the person its first sign-in was: another account at the
// provider that maps to the same user (the bad input: alice's address given
// to someone new, with another sub) cannot enrol a device as alice, and
// alice's groups stay as they were. A user an administrator created is bound
// by its first sign-in.
func TestSSOUserBoundToAccount(t *testing.T) {
	t.Parallel()
	newAlice := testidp.Person{Subject: "s-alice-new", Email: "alice@example.org", EmailVerified: true, Groups: []string{"admins"}}
	bob := testidp.Person{Subject: "s-bob", Email: "bob@example.org", EmailVerified: true, Groups: []string{"dev"}}
	idp := testidp.Start(t, ssoAlice, newAlice, bob)
	ts := newTestServer(t)
	ts.Enroller.SSO = &SSO{Issuer: idp.Issuer, ClientID: testidp.ClientID, Domain: "example.org"}
	ctx := context.Background()
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, testidp.ClientID, ssoAlice.Subject), "laptop", newKey(t)); err != nil {
		t.Fatal(err)
	}
	before, _ := ts.Users.Lookup("alice@laptop")
	_, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, testidp.ClientID, newAlice.Subject), "phone", newKey(t))
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusForbidden || !strings.Contains(se.Message, "belongs to another account") {
		t.Fatalf("another account with alice's address enrolling a device as alice: %v; want 403", err)
	}
	if _, err := ts.Users.Device("alice@phone"); err == nil {
		t.Fatal("alice@phone was enrolled by another account")
	}
	if after, _ := ts.Users.Lookup("alice@laptop"); !slices.Equal(before, after) {
		t.Fatalf("alice's groups went from %v to %v on a refused sign-in", before, after)
	}
	// The same person signs in again: still alice.
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, testidp.ClientID, ssoAlice.Subject), "desktop", newKey(t)); err != nil {
		t.Fatalf("alice's own second sign-in: %v", err)
	}
	// An administrator's user: bound by its first sign-in, then held.
	if _, err := ts.Users.Enroll("bob", "pc", nil, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, testidp.ClientID, bob.Subject), "laptop", newKey(t)); err != nil {
		t.Fatalf("bob's first sign-in: %v", err)
	}
	var bound string
	for _, u := range ts.Users.Users() {
		if u.Name == "bob" {
			bound = u.SSOSubject
		}
	}
	if bound != bob.Subject {
		t.Fatalf("bob is bound to %q; want %q", bound, bob.Subject)
	}
}
