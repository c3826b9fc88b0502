package acme

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"net/http"
	"strings"
	"sync"
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
