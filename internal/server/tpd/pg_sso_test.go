package tpd

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testidp"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// Two tpd on one database, both signing people in with one provider: an ID
// token that enrolled a device through A is refused by B (the bad input: a
// leaked token replayed on another instance, for a device of its own). Each
// instance remembering only its own tokens let one token enrol a device per
// instance.
func TestPGSSOTokenEnrolsOneDeviceAcrossInstances(t *testing.T) {
	t.Parallel()
	idp := testidp.Start(t, testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true})
	_, dsn := testpg.NewDatabase(t)
	cfgA := pgDataDir(t, dsn, nil)
	cfgA.SSOIssuer, cfgA.SSOClientID, cfgA.SSODomain = idp.Issuer, testidp.ClientID, "example.org"
	a := runDaemon(t, cfgA)
	cfgB := pgDataDir(t, dsn, &cfgA)
	cfgB.SSOIssuer, cfgB.SSOClientID, cfgB.SSODomain = idp.Issuer, testidp.ClientID, "example.org"
	b := runDaemon(t, cfgB)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	info := login.SSOInfo{Issuer: idp.Issuer, ClientID: testidp.ClientID, Scopes: []string{"openid", "email", "profile"}}
	var approveErr error
	idToken, err := login.SignIn(ctx, http.DefaultClient, info, func(c login.DeviceCode) {
		approveErr = idp.Approve(ctx, c.Code, "s-alice")
	})
	if err != nil || approveErr != nil {
		t.Fatalf("signing alice in at the provider: %v %v", err, approveErr)
	}
	root, err := login.FetchRoot(ctx, a.url, a.d.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	hc := login.HTTPClient(root)
	defer hc.CloseIdleConnections()
	enrol := func(url, device string) (login.EnrollSSOResponse, error) {
		key, err := clients.NewDeviceKey()
		if err != nil {
			t.Fatal(err)
		}
		return login.EnrollDeviceSSO(ctx, hc, url, idToken.IDToken, device, key)
	}
	if res, err := enrol(a.url, "laptop"); err != nil || res.DeviceID != "alice@laptop" {
		t.Fatalf("enrolling alice@laptop through A: %+v, %v", res, err)
	}
	_, err = enrol(b.url, "phone")
	if err == nil || !strings.Contains(err.Error(), "this sign-in already enrolled a device") {
		t.Fatalf("the same ID token through B for another device: %v; want it refused as used", err)
	}
	if _, err := b.d.Users().Device("alice@phone"); err == nil {
		t.Fatal("B enrolled alice@phone with a token A had used")
	}
}
