package acme

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testidp"
)

// shareServer is ssoServer whose people may share any name but "private"
// with guests of other.org, and whose CA ends a guest's certificates with
// its share, as tpd wires them.
func shareServer(t *testing.T) (*testServer, *testidp.IdP) {
	t.Helper()
	ts, idp := ssoServer(t)
	ts.Enroller.SSO.GuestDomains = []string{"other.org"}
	ts.Enroller.ReverseZone = "rev.tp.internal"
	ts.Enroller.MayShare = func(_ context.Context, id authz.Identity, label string, _ bool) (bool, string) {
		if label == "private" {
			return false, "the policy does not let " + id.DeviceID + " keep private exposed"
		}
		return true, ""
	}
	ts.CA.SetDeviceEnds(func(deviceID string) time.Time {
		d, err := ts.Users.Device(deviceID)
		id, ok := strings.CutPrefix(d.GrantedBy, users.ShareApprover)
		if err != nil || !ok {
			return time.Time{}
		}
		sh, err := ts.Users.Share(id)
		if err != nil {
			return time.Unix(1, 0)
		}
		return sh.Until
	})
	return ts, idp
}

// A person shares a name from an enrolled device; a guest outside the
// domain signs in with the provider and gets a device of their own, scoped
// to that name, whose certificate ends with the share; the share revoked,
// the guest's login is refused naming it. Bad input: shares the server
// refuses (each named below), a guest with nothing shared, a second
// enrolment for a full share's name, and a login after the revocation.
func TestShareAndGuestSignIn(t *testing.T) {
	t.Parallel()
	ts, idp := shareServer(t)
	ctx := context.Background()
	aliceKey := newKey(t)
	if _, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, testidp.ClientID, ssoAlice.Subject), "laptop", aliceKey); err != nil {
		t.Fatal(err)
	}
	share := func(name, guest string, until time.Time) (login.ShareInfo, error) {
		return login.Share(ctx, ts.HC, ts.URL, "alice@laptop", aliceKey, name, guest, until)
	}
	soon := time.Now().Add(30 * time.Minute)
	for _, c := range []struct {
		what, name, guest string
		until             time.Time
		status            int
		says              string
	}{
		{"a guest of the server's own domain", "web", "bob@example.org", soon, 400, "is of this server's own domain example.org"},
		{"a guest of a domain sso-guest-domains does not name", "web", "eve@else.org", soon, 403, "guests of else.org may not be let in"},
		{"everyone at a domain not named", "web", "@else.org", soon, 403, "a share with everyone at else.org needs else.org named"},
		{"a name that is no label", "Web.Site", "carol@other.org", soon, 400, "is not a reverse name's label"},
		{"an end in the past", "web", "carol@other.org", time.Now().Add(-time.Hour), 400, "in the past or within a minute"},
		{"an end past 30 days", "web", "carol@other.org", time.Now().Add(31 * 24 * time.Hour), 400, "a share lasts at most"},
		{"a name the policy does not let alice keep", "private", "carol@other.org", soon, 403, "does not let alice@laptop keep private exposed"},
		{"no address at all", "web", "carol", soon, 400, "no '@'"},
	} {
		_, err := share(c.name, c.guest, c.until)
		var se *login.ServerError
		if !errors.As(err, &se) || se.Status != c.status || !strings.Contains(se.Message, c.says) {
			t.Errorf("%s: %v; want %d saying %q", c.what, err, c.status, c.says)
		}
	}
	if len(ts.Users.Shares()) != 0 {
		t.Fatalf("refused shares were recorded: %+v", ts.Users.Shares())
	}

	// Carol, with nothing shared yet, is refused saying so.
	_, err := login.EnrollDeviceSSO(ctx, ts.HC, ts.URL, signIn(t, idp, testidp.ClientID, ssoCarol.Subject), "pc", newKey(t))
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusForbidden || !strings.Contains(se.Message, "nobody has shared a name with carol@other.org") {
		t.Fatalf("carol's sign-in with nothing shared: %v", err)
	}

	sh, err := share("web", "Carol@Other.org", soon)
	if err != nil || sh.Guest != "carol@other.org" || sh.Host != "web.rev.tp.internal" || sh.State != "active" {
		t.Fatalf("alice's share: %+v, %v", sh, err)
	}
	carolKey := newKey(t)
	got, err := login.EnrollDeviceSSOShare(ctx, ts.HC, ts.URL, signIn(t, idp, testidp.ClientID, ssoCarol.Subject), "pc", "web", carolKey)
	if err != nil || got.DeviceID != "carol_other.org@pc" || got.Guest == nil || got.Guest.Name != "web" || got.Guest.Share != sh.ID || len(got.Groups) != 0 {
		t.Fatalf("carol's sign-in by the share: %+v, %v", got, err)
	}
	if sc := ts.Users.Scope(got.DeviceID); sc != "guest:web" {
		t.Fatalf("carol's device has scope %q; want guest:web", sc)
	}
	creds, err := login.Login(ctx, ts.HC, ts.URL, got.DeviceID, carolKey, nil)
	if err != nil {
		t.Fatal(err)
	}
	if na := creds.Chain[0].NotAfter; na.After(soon.Add(time.Second)) {
		t.Fatalf("carol's certificate ends %s, after the share's end %s", na, soon)
	}
	// A guest cannot share, list or revoke: a scoped credential.
	if _, err := login.Share(ctx, ts.HC, ts.URL, got.DeviceID, carolKey, "web", "dan@other.org", soon); err == nil || !strings.Contains(err.Error(), "is itself a scoped credential") {
		t.Fatalf("a guest sharing: %v", err)
	}

	list, err := login.ListShares(ctx, ts.HC, ts.URL, "alice@laptop", aliceKey)
	if err != nil || len(list) != 1 || list[0].ID != sh.ID || len(list[0].Guests) != 1 || list[0].Guests[0] != got.DeviceID {
		t.Fatalf("alice's shares: %+v, %v", list, err)
	}
	if _, err := login.RevokeShare(ctx, ts.HC, ts.URL, "alice@laptop", aliceKey, sh.ID); err != nil {
		t.Fatal(err)
	}
	_, err = login.Login(ctx, ts.HC, ts.URL, got.DeviceID, carolKey, nil)
	if err == nil || !strings.Contains(err.Error(), "the share of web with carol@other.org ("+sh.ID+") was revoked") {
		t.Fatalf("carol's login after the revocation: %v", err)
	}
}
