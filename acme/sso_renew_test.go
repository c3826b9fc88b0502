package acme

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
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
	creds, err := login.LoginSignedIn(ctx, ts.HC, ts.URL, "alice@laptop", devKey, nil, func(context.Context) (string, error) {
		asked++
		return signIn(t, idp, testidp.ClientID, ssoAlice.Subject), nil
	})
	if err != nil || asked != 1 || len(creds.Chain) == 0 {
		t.Fatalf("a login with alice's fresh sign-in: %v (asked %d times)", err, asked)
	}
	if groups, err := ts.Users.Lookup("alice@laptop"); err != nil || !slices.Equal(groups, []string{"ops"}) {
		t.Fatalf("alice's groups after the renewal: %v, %v; want the provider's: ops", groups, err)
	}

	_, err = login.LoginSignedIn(ctx, ts.HC, ts.URL, "alice@laptop", devKey, nil, func(context.Context) (string, error) {
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
