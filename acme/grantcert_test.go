package acme

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
)

// A grant to connect (a browser's: TP.js): alice approves a key with scope
// dial:ssh or dial:*, without the policy's say on exposing; the key's holder
// gets a device certificate for that very key, which TP's issuer check and
// identity accept, signed as WebCrypto signs (r||s). Bad input: a key nobody
// approved, a request signed by another key, a grant to expose asking for
// such a certificate, a revoked grant, a grant link asking to connect and to
// expose at once.
func TestGrantToConnect(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ts, alice, _ := grantEnv(t)
	ts.Enroller.MaxGrants = 10
	refused := func(what string, err error, status int, says string) {
		t.Helper()
		var se *login.ServerError
		if !errors.As(err, &se) || se.Status != status || !strings.Contains(se.Message, says) {
			t.Errorf("%s: %v; want %d saying %q", what, err, status, says)
		}
	}
	browser := newKey(t)
	if _, _, err := login.GrantCertificate(ctx, ts.HC, ts.URL, browser); !errors.Is(err, login.ErrGrantPending) {
		t.Fatalf("a certificate before any approval: %v; want ErrGrantPending", err)
	}
	// The policy would not let alice expose "ssh": a grant to connect does not ask it.
	res, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Server: ts.URL, Name: "ssh", App: "a browser", Key: pubDER(t, browser), Dial: true})
	if err != nil || res.Scope != "dial:ssh" {
		t.Fatalf("approving a grant to connect to ssh: %+v, %v", res, err)
	}
	chain, out, err := login.GrantCertificate(ctx, ts.HC, ts.URL, browser)
	if err != nil {
		t.Fatal(err)
	}
	leaf := chain[0]
	if !leaf.PublicKey.(*ecdsa.PublicKey).Equal(browser.Public()) {
		t.Fatal("the certificate is not for the browser's key")
	}
	if err := (authz.Issuer{Root: ts.PKI.Root, Intermediate: ts.PKI.Intermediate}).VerifyLeaf(leaf, time.Now()); err != nil {
		t.Fatalf("TP's issuer check refuses the certificate: %v", err)
	}
	id, err := authz.IdentityFromCert(leaf)
	if err != nil || id.DeviceID != res.DeviceID || out.DeviceID != res.DeviceID || out.Scope != "dial:ssh" {
		t.Fatalf("the certificate's identity: %+v, %v; answer %+v; want %s", id, err, out, res.DeviceID)
	}
	if life := time.Until(leaf.NotAfter); life < 3*time.Hour || life > DefaultCertLifetime {
		t.Errorf("the certificate lives %s; want the device certificates' %s", life, DefaultCertLifetime)
	}
	if _, err := ts.CA.IssuedCertificate(leaf.SerialNumber); err != nil {
		t.Errorf("the CA's database does not know the certificate (tpd revoke --serial could not find it): %v", err)
	}

	// Signed as WebCrypto signs: r||s, not ASN.1.
	pub := base64.StdEncoding.EncodeToString(pubDER(t, browser))
	now := time.Now().UTC().Format(time.RFC3339)
	sum := sha256.Sum256(login.GrantCertificateMessage(pub, now))
	r, s, err := ecdsa.Sign(rand.Reader, browser, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	raw := make([]byte, 64)
	r.FillBytes(raw[:32])
	s.FillBytes(raw[32:])
	var got login.GrantCertificateResponse
	if err := postForTest(ctx, ts, login.PathGrantCertificate, login.GrantStatusRequest{PublicKey: pub, Time: now,
		Signature: base64.StdEncoding.EncodeToString(raw)}, &got); err != nil || got.DeviceID != res.DeviceID {
		t.Fatalf("a request signed r||s: %+v, %v", got, err)
	}
	forged, _ := login.SignMessage(alice, login.GrantCertificateMessage(pub, now))
	err = postForTest(ctx, ts, login.PathGrantCertificate, login.GrantStatusRequest{PublicKey: pub, Time: now, Signature: forged}, &got)
	refused("a request signed by another key", err, 403, "only the application holding it may ask")

	// dial:* is the person's dials, whatever the policy lets them reach.
	anyKey := newKey(t)
	if res, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Server: ts.URL, Name: "*", Key: pubDER(t, anyKey), Dial: true}); err != nil || res.Scope != "dial:*" {
		t.Fatalf("approving a grant to connect anywhere the policy allows: %+v, %v", res, err)
	}

	// A grant to expose logs in with ACME: no certificate here.
	ci := newKey(t)
	if _, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Server: ts.URL, Name: "ci", Key: pubDER(t, ci)}); err != nil {
		t.Fatal(err)
	}
	_, _, err = login.GrantCertificate(ctx, ts.HC, ts.URL, ci)
	refused("a grant to expose asking for a key certificate", err, 403, "logs in as any device does")

	// Revoked, the grant gets nothing more.
	if err := ts.Users.RevokeDevice(res.DeviceID); err != nil {
		t.Fatal(err)
	}
	_, _, err = login.GrantCertificate(ctx, ts.HC, ts.URL, browser)
	refused("a revoked grant", err, 403, "revoked")

	if _, err := login.ParseGrantLink(ts.URL + login.PathGrantPage + "?name=ssh&dial=1&public=1&key=" + base64.RawURLEncoding.EncodeToString(pubDER(t, newKey(t)))); err == nil {
		t.Error("a link asking to connect and to expose publicly was taken")
	}

	// Bound to a page's origin: served to requests from that origin only
	// (a browser sets Origin itself); a link's origin that is no origin is refused.
	paged := newKey(t)
	res, err = login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Server: ts.URL, Name: "*", Key: pubDER(t, paged), Dial: true, Origin: "https://tp.example.org"})
	if err != nil || res.Scope != "dial:*@https://tp.example.org" {
		t.Fatalf("approving a grant bound to an origin: %+v, %v", res, err)
	}
	ask := func(origin string) (int, string) {
		pub := base64.StdEncoding.EncodeToString(pubDER(t, paged))
		now := time.Now().UTC().Format(time.RFC3339)
		sig, _ := login.SignMessage(paged, login.GrantCertificateMessage(pub, now))
		body, _ := json.Marshal(login.GrantStatusRequest{PublicKey: pub, Time: now, Signature: sig})
		req, _ := http.NewRequest(http.MethodPost, ts.URL+login.PathGrantCertificate, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		resp, err := ts.HC.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, other := range []string{"", "https://evil.example", "https://tp.example.org:8443"} {
		if st, body := ask(other); st != http.StatusForbidden || !strings.Contains(body, "may be used from pages of https://tp.example.org only") {
			t.Errorf("a certificate asked from origin %q: %d %s; want 403", other, st, body)
		}
	}
	if st, body := ask("https://tp.example.org"); st != http.StatusOK {
		t.Errorf("a certificate asked from its origin: %d %s", st, body)
	}
	for _, bad := range []string{"http://tp.example.org", "https://tp.example.org/path", "tp.example.org"} {
		_, err := login.Approve(ctx, ts.HC, ts.URL, "alice@laptop", alice, login.Grant{Server: ts.URL, Name: "*", Key: pubDER(t, newKey(t)), Dial: true, Origin: bad})
		refused("a grant bound to "+bad, err, 400, "is not a web origin")
	}
}
