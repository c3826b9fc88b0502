package acme

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/server/users"
)

// grantEnv is a test server whose policy lets alice, not bob, keep ci
// exposed, with alice@laptop and bob@pc enrolled.
func grantEnv(t *testing.T) (ts *testServer, alice, bob *ecdsa.PrivateKey) {
	t.Helper()
	ts = newTestServer(t)
	ts.Enroller.MayExpose = func(_ context.Context, id authz.Identity, label string, _ bool) (bool, string) {
		if id.User == "alice" && label == "ci" {
			return true, ""
		}
		return false, "the policy does not let " + id.DeviceID + " keep " + label + " exposed"
	}
	ts.Enroller.MaxGrants = 2
	enrol := func(user, device string) *ecdsa.PrivateKey {
		enr, err := ts.Users.Enroll(user, device, nil, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		key := newKey(t)
		if _, err := login.EnrollDevice(context.Background(), ts.HC, ts.URL, enr.Token, key); err != nil {
			t.Fatal(err)
		}
		return key
	}
	return ts, enrol("alice", "laptop"), enrol("bob", "pc")
}

func pubDER(t *testing.T, k *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// An application's key becomes a device of the approving person's user,
// scoped to keeping one name exposed, once that person approves it from an
// enrolled device and the policy lets the person keep the name exposed.
// Bad input: an approver the policy refuses, a forged approval, names and
// application texts TP does not take, a key that is not P-256, a status
// asked without the key, a scoped device approving, one grant past the bound,
// a revoked grant, a server that grants nothing.
func TestGrant(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ts, alice, bob := grantEnv(t)
	app := newKey(t)
	g := login.Grant{Server: ts.URL, Name: "ci", App: "ci job", Key: pubDER(t, app)}
	refused := func(what string, err error, status int, says string) {
		t.Helper()
		var se *login.ServerError
		if !errors.As(err, &se) || se.Status != status || !strings.Contains(se.Message, says) {
			t.Errorf("%s: %v; want %d saying %q", what, err, status, says)
		}
	}

	if _, err := login.GrantStatus(ctx, ts.HC, ts.URL, app); !errors.Is(err, login.ErrGrantPending) {
		t.Fatalf("the status before any approval: %v; want ErrGrantPending", err)
	}
	_, err := login.Approve(ctx, ts.HC, ts.URL, "bob@pc", bob, g)
	refused("bob approving", err, 403, "the policy does not let bob@pc keep ci exposed")
	_, err = login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", bob, g)
	refused("an approval in alice's name signed by bob's key", err, 403, "alice@laptop")
	for _, bad := range []struct {
		what string
		g    login.Grant
		says string
	}{
		{"a name with its zone", login.Grant{Name: "ci.rev.tp.internal", Key: g.Key}, "is not a reverse name's label"},
		{"an upper-case name", login.Grant{Name: "CI", Key: g.Key}, "is not a reverse name's label"},
		{"an application text of 65 bytes", login.Grant{Name: "ci", App: strings.Repeat("x", 65), Key: g.Key}, "at most 64"},
		{"an application text with a newline", login.Grant{Name: "ci", App: "ci\njob", Key: g.Key}, "may hold letters"},
		{"an application text dressed as the code", login.Grant{Name: "ci", App: "build (code ABCD-EFGH)", Key: g.Key}, "may hold letters"},
		{"a key that is no key", login.Grant{Name: "ci", Key: []byte("not a key")}, "app_key"},
	} {
		_, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, bad.g)
		refused(bad.what, err, 400, bad.says)
	}

	res, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, g)
	if err != nil {
		t.Fatal(err)
	}
	code := strings.ToLower(strings.ReplaceAll(login.GrantCode(g.Key), "-", ""))
	if res.DeviceID != "alice@grant-"+code || res.Scope != "expose:ci" {
		t.Fatalf("the approval: %+v; want alice@grant-%s with scope expose:ci", res, code)
	}
	if again, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, g); err != nil || again != res {
		t.Fatalf("the same approval again: %+v, %v; want %+v", again, err, res)
	}
	if st, err := login.GrantStatus(ctx, ts.HC, ts.URL, app); err != nil || st != res {
		t.Fatalf("the status after the approval: %+v, %v; want %+v", st, err, res)
	}
	// The status is the key holder's: another key's signature over it is refused.
	ts2 := time.Now().UTC().Format(time.RFC3339)
	forged, _ := login.SignMessage(bob, login.GrantStatusMessage(base64.StdEncoding.EncodeToString(g.Key), ts2))
	var out login.GrantResponse
	err = postForTest(ctx, ts, login.PathGrantStatus, login.GrantStatusRequest{PublicKey: base64.StdEncoding.EncodeToString(g.Key), Time: ts2, Signature: forged}, &out)
	refused("a status signed by another key", err, 403, "only the application holding it may ask")

	// The granted device cannot grant in turn.
	_, err = login.Approve(ctx, ts.HC, ts.URL, res.DeviceID, app, login.Grant{Name: "ci", Key: pubDER(t, newKey(t))})
	refused("the granted device approving", err, 403, "is itself a scoped credential")

	// Two grants at most (MaxGrants 2): the third is refused.
	if _, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Name: "ci", Key: pubDER(t, newKey(t))}); err != nil {
		t.Fatal(err)
	}
	_, err = login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Name: "ci", Key: pubDER(t, newKey(t))})
	refused("a third grant", err, 403, "already holds 2 grants")

	// A revoked grant: its application is told so, and the key is not granted again.
	if err := ts.Users.RevokeDevice(res.DeviceID); err != nil {
		t.Fatal(err)
	}
	_, err = login.GrantStatus(ctx, ts.HC, ts.URL, app)
	refused("the status of a revoked grant", err, 403, "revoked")
	_, err = login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, g)
	refused("approving a revoked grant's key again", err, 403, "was revoked")

	ts.Enroller.MayExpose = nil
	_, err = login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Name: "ci", Key: pubDER(t, newKey(t))})
	refused("a server that grants nothing", err, 403, "does not grant credentials")
}

// A grant link carries the request whole, and what is not one is refused
// with a sentence that says where a link comes from.
func TestGrantLink(t *testing.T) {
	key := pubDER(t, newKey(t))
	g := login.Grant{Server: "https://tp.example.org:8443", Name: "ci", Public: true, App: "ci job + co", Key: key}
	back, err := login.ParseGrantLink(g.Link())
	if err != nil || back.Server != g.Server || back.Name != "ci" || !back.Public || back.App != g.App || string(back.Key) != string(key) {
		t.Fatalf("ParseGrantLink(%q) = %+v, %v", g.Link(), back, err)
	}
	for _, bad := range []string{
		"http://tp.example.org/grant?name=ci&key=" + base64.RawURLEncoding.EncodeToString(key),
		"https://tp.example.org/elsewhere?name=ci&key=" + base64.RawURLEncoding.EncodeToString(key),
		"https://tp.example.org/grant?name=ci",
		"https://tp.example.org/grant?name=ci&key=bm90IGEga2V5",
		"https://tp.example.org/grant?key=" + base64.RawURLEncoding.EncodeToString(key),
	} {
		if _, err := login.ParseGrantLink(bad); err == nil || !strings.Contains(err.Error(), "tp expose --request printed") {
			t.Errorf("ParseGrantLink(%q): %v; want a refusal naming where links come from", bad, err)
		}
	}
	if c := login.GrantCode(key); len(c) != 19 || c[4] != '-' || c[9] != '-' || c[14] != '-' {
		t.Errorf("GrantCode = %q; want XXXX-XXXX-XXXX-XXXX", c)
	}
	if _, err := login.ParseGrantLink(login.Grant{Server: "https://tp.example.org", Name: "ci", App: "build (code ABCD-EFGH)", Key: key}.Link()); err == nil {
		t.Error("a link whose application name is dressed as the code was accepted")
	}
}

// A key belongs to one device: a revoked grant's key is not granted again,
// even by another user, nor is an enrolled device's key. A grant revoked by
// the deny list (tpd revoke --device) no longer counts against the bound and
// is not re-approved. An application approved for another name than it asked
// (someone else approved its key first) refuses the grant. Bad input: each of
// those.
func TestGrantKeysAndDenyList(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ts, alice, bob := grantEnv(t)
	denied := map[string]bool{}
	ts.Enroller.Denied = func(dev users.Device) (string, bool) {
		if denied[dev.ID] {
			return "device " + dev.ID + " was revoked by tpd revoke", true
		}
		return "", false
	}
	ts.Enroller.MayExpose = func(_ context.Context, id authz.Identity, label string, _ bool) (bool, string) {
		return id.User == "alice" && label == "ci" || id.User == "bob" && label == "bobs", "not this name"
	}
	refused := func(what string, err error, status int, says string) {
		t.Helper()
		var se *login.ServerError
		if !errors.As(err, &se) || se.Status != status || !strings.Contains(se.Message, says) {
			t.Errorf("%s: %v; want %d saying %q", what, err, status, says)
		}
	}
	// An enrolled device's key.
	_, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Name: "ci", Key: pubDER(t, bob)})
	refused("a grant of bob@pc's own key", err, 409, "belongs to another device")

	// Deny-listed grants free their room and are not approved again.
	first := newKey(t)
	res, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Name: "ci", Key: pubDER(t, first)})
	if err != nil {
		t.Fatal(err)
	}
	second := newKey(t)
	res2, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Name: "ci", Key: pubDER(t, second)})
	if err != nil {
		t.Fatal(err)
	}
	denied[res.DeviceID], denied[res2.DeviceID] = true, true
	if _, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Name: "ci", Key: pubDER(t, newKey(t))}); err != nil {
		t.Fatalf("a grant once both earlier ones were deny-listed (bound 2): %v", err)
	}
	_, err = login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Name: "ci", Key: pubDER(t, first)})
	refused("approving a deny-listed grant's key again", err, 403, "was revoked")
	_, err = login.GrantStatus(ctx, ts.HC, ts.URL, first)
	refused("the status of a deny-listed grant", err, 403, "was revoked by tpd revoke")
	// The revoked key under another user.
	_, err = login.Approve(ctx, ts.HC, ts.URL, "bob@pc", bob, login.Grant{Name: "bobs", Key: pubDER(t, first)})
	refused("bob approving alice's revoked grant's key", err, 409, "belongs to another device")

	// Bob approves a waiting application's key for his own name first: the
	// application, which asked for ci, refuses it.
	home := clients.Home{Dir: filepath.Join(t.TempDir(), "app")}
	shown := make(chan []byte, 1)
	done := make(chan error, 1)
	go func() {
		_, err := clients.RequestGrant(ctx, home, clients.GrantRequest{Server: ts.URL, Fingerprint: ts.PKI.Fingerprint(), Name: "ci",
			Poll: 20 * time.Millisecond, Show: func(link, _ string) {
				g, _ := login.ParseGrantLink(link)
				shown <- g.Key
			}})
		done <- err
	}()
	key := <-shown
	if _, err := login.Approve(ctx, ts.HC, ts.URL, "bob@pc", bob, login.Grant{Name: "bobs", Key: key}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil || !strings.Contains(err.Error(), `with scope "expose:bobs", not the "expose:ci" this application asked for`) {
		t.Fatalf("the application approved for another name: %v", err)
	}
	if _, err := home.Profile(); err == nil {
		t.Fatal("the application saved the grant it refused")
	}

	// An application that takes only alice's approval refuses bob's, even
	// for the name it asked for (bob saw the link first).
	home = clients.Home{Dir: filepath.Join(t.TempDir(), "app2")}
	go func() {
		_, err := clients.RequestGrant(ctx, home, clients.GrantRequest{Server: ts.URL, Fingerprint: ts.PKI.Fingerprint(), Name: "bobs",
			Approver: "alice", Poll: 20 * time.Millisecond, Show: func(link, _ string) {
				g, _ := login.ParseGrantLink(link)
				shown <- g.Key
			}})
		done <- err
	}()
	key = <-shown
	if _, err := login.Approve(ctx, ts.HC, ts.URL, "bob@pc", bob, login.Grant{Name: "bobs", Key: key}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil || !strings.Contains(err.Error(), "was approved by another user than alice (it is bob's credential bob@grant-") {
		t.Fatalf("the application approved by bob, not its approver alice: %v", err)
	}
	if _, err := home.Profile(); err == nil {
		t.Fatal("the application saved the grant it refused")
	}
}

// A person lists the grants of their user and revokes one for good, from an
// enrolled device. Bad input: a revocation of the person's own device, which
// is no grant; of another user's grant; one signed by another device's key;
// the grant itself asking.
func TestGrantListAndRevoke(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ts, alice, bob := grantEnv(t)
	var revoked []string
	ts.Enroller.GrantRevoked = func(g users.Device, by, _ string) { revoked = append(revoked, g.ID+" by "+by) }
	app := newKey(t)
	res, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Name: "ci", Key: pubDER(t, app)})
	if err != nil {
		t.Fatal(err)
	}
	gs, err := login.ListGrants(ctx, ts.HC, ts.URL, "alice@laptop", alice)
	if err != nil || len(gs) != 1 || gs[0].DeviceID != res.DeviceID || gs[0].Scope != "expose:ci" || gs[0].GrantedBy != "alice@laptop" || gs[0].Revoked {
		t.Fatalf("alice's grants: %+v, %v", gs, err)
	}
	if gs, err := login.ListGrants(ctx, ts.HC, ts.URL, "bob@pc", bob); err != nil || len(gs) != 0 {
		t.Fatalf("bob's grants: %+v, %v; want none", gs, err)
	}
	refused := func(what string, err error, status int, says string) {
		t.Helper()
		var se *login.ServerError
		if !errors.As(err, &se) || se.Status != status || !strings.Contains(se.Message, says) {
			t.Errorf("%s: %v; want %d saying %q", what, err, status, says)
		}
	}
	_, err = login.RevokeGrant(ctx, ts.HC, ts.URL, "alice@laptop", alice, "alice@laptop")
	refused("revoking alice's own device as a grant", err, 404, `alice holds no grant "alice@laptop"`)
	_, err = login.RevokeGrant(ctx, ts.HC, ts.URL, "bob@pc", bob, res.DeviceID)
	refused("bob revoking alice's grant", err, 404, "bob holds no grant")
	_, err = login.RevokeGrant(ctx, ts.HC, ts.URL, "alice@laptop", bob, res.DeviceID)
	refused("a revocation signed by bob's key as alice@laptop", err, 403, "")
	_, err = login.ListGrants(ctx, ts.HC, ts.URL, res.DeviceID, app)
	refused("the grant listing grants", err, 403, "is itself a scoped credential (expose:ci)")
	if len(revoked) != 0 {
		t.Fatalf("refused revocations revoked %v", revoked)
	}

	g, err := login.RevokeGrant(ctx, ts.HC, ts.URL, "alice@laptop", alice, res.DeviceID)
	if err != nil || !g.Revoked || g.DeviceID != res.DeviceID {
		t.Fatalf("alice revoking her grant: %+v, %v", g, err)
	}
	if len(revoked) != 1 || revoked[0] != res.DeviceID+" by alice@laptop" {
		t.Fatalf("tpd was told of %v", revoked)
	}
	revoked = nil
	if _, err := login.GrantStatus(ctx, ts.HC, ts.URL, app); err == nil {
		t.Fatal("the revoked grant's status still answers")
	}
	// A grant made before grants recorded their approver (its scope and its
	// grant- name tell) is listed and revoked like the others.
	enr, err := ts.Users.Enroll("alice", "grant-olderolderolder", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Users.Redeem(enr.Token, pubDER(t, newKey(t))); err != nil {
		t.Fatal(err)
	}
	if err := ts.Users.SetScope("alice@grant-olderolderolder", "expose:ci"); err != nil {
		t.Fatal(err)
	}
	gs, err = login.ListGrants(ctx, ts.HC, ts.URL, "alice@laptop", alice)
	if err != nil || len(gs) != 2 || gs[1].DeviceID != "alice@grant-olderolderolder" || gs[1].GrantedBy != "" {
		t.Fatalf("alice's grants with one made before approvers were recorded: %+v, %v", gs, err)
	}
	if g, err := login.RevokeGrant(ctx, ts.HC, ts.URL, "alice@laptop", alice, "alice@grant-olderolderolder"); err != nil || !g.Revoked {
		t.Fatalf("revoking the older grant: %+v, %v", g, err)
	}

	// Again: the same answer, and tpd is not told twice.
	if g, err := login.RevokeGrant(ctx, ts.HC, ts.URL, "alice@laptop", alice, res.DeviceID); err != nil || !g.Revoked || len(revoked) != 1 {
		t.Fatalf("the revocation again: %+v, %v, told %v", g, err, revoked)
	}
}
