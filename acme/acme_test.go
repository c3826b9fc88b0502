package acme

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

type testServer struct {
	URL   string
	PKI   *PKI
	CA    *CA
	Users users.Store
	HC    *http.Client
	skew  atomic.Int64 // added to the user store's clock
	// Enroller serves the enrollment endpoints; a test may set its fields
	// before its first request.
	Enroller *Enroller
}

// newTestServer runs the real embedded CA and enrollment endpoints on a loopback
// HTTPS server whose certificate is issued by the PKI under test.
func newTestServer(t *testing.T) *testServer {
	t.Helper()
	return newTestServerWith(t, CAOptions{})
}

// newTestServerWith is newTestServer with CA options (DBPath is set here).
func newTestServerWith(t *testing.T, opts CAOptions) *testServer {
	t.Helper()
	dir := t.TempDir()
	pki, err := Bootstrap(filepath.Join(dir, "ca"), "test")
	if err != nil {
		t.Fatal(err)
	}
	opts.DBPath = DBPath(dir)
	ca, err := NewCA(pki, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	ts := &testServer{}
	st, err := users.Open(filepath.Join(dir, "users.json"), users.WithClock(func() time.Time {
		return time.Now().Add(time.Duration(ts.skew.Load()))
	}))
	if err != nil {
		t.Fatal(err)
	}
	enr := &Enroller{PKI: pki, CA: ca, Users: st}
	mux := http.NewServeMux()
	mux.Handle("/acme/", ca.Handler())
	mux.Handle("/tp/", enr.Handler())
	srv := httptest.NewUnstartedServer(mux)
	chain, key, _, err := pki.IssueServerCert([]string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: chain, PrivateKey: key}}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	ts.URL, ts.PKI, ts.CA, ts.Users, ts.HC, ts.Enroller = srv.URL, pki, ca, st, login.HTTPClient(pki.Root), enr
	return ts
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestBootstrapIsStable(t *testing.T) {
	dir := t.TempDir()
	a, err := Bootstrap(dir, "x")
	if err != nil {
		t.Fatal(err)
	}
	b, err := Bootstrap(dir, "x")
	if err != nil {
		t.Fatal(err)
	}
	if a.Fingerprint() != b.Fingerprint() {
		t.Fatal("second start made a new root")
	}
}

func TestNormalizeFingerprint(t *testing.T) {
	fp := strings.Repeat("ab", 32)
	for _, in := range []string{"SHA256:" + fp, "sha256:" + strings.ToUpper(fp), fp, "AB:" + strings.Repeat("AB:", 30) + "AB"} {
		got, err := login.NormalizeFingerprint(in)
		if err != nil || got != "SHA256:"+fp {
			t.Errorf("NormalizeFingerprint(%q) = %q, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "SHA256:", "SHA256:zz", fp[:62]} {
		if _, err := login.NormalizeFingerprint(bad); err == nil {
			t.Errorf("NormalizeFingerprint(%q) accepted a malformed fingerprint", bad)
		}
	}
}

// The whole login against the real embedded step-ca: enroll with a token, then
// device-attest-01 with EAB; the certificate is a 4-hour clientAuth-only identity.
func TestEnrollAndLogin(t *testing.T) {
	ts := newTestServer(t)
	ctx := context.Background()

	root, err := login.FetchRoot(ctx, ts.URL, ts.PKI.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	if !root.Equal(ts.PKI.Root) {
		t.Fatal("fetched root differs")
	}
	enr, err := ts.Users.Enroll("alice", "laptop", []string{"dev"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	devKey := newKey(t)
	got, err := login.EnrollDevice(ctx, ts.HC, ts.URL, enr.Token, devKey)
	if err != nil {
		t.Fatal(err)
	}
	if got.DeviceID != "alice@laptop" {
		t.Fatalf("device id %q", got.DeviceID)
	}
	var lines []string
	creds, err := login.Login(ctx, ts.HC, ts.URL, "alice@laptop", devKey, func(s string) { lines = append(lines, s) })
	if err != nil {
		t.Fatal(err)
	}
	leaf := creds.Chain[0]
	if life := leaf.NotAfter.Sub(leaf.NotBefore); life < 4*time.Hour-2*time.Minute || life > 4*time.Hour+2*time.Minute {
		t.Errorf("certificate lifetime %s, want 4h", life)
	}
	if len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Errorf("ExtKeyUsage %v, want clientAuth only", leaf.ExtKeyUsage)
	}
	id, err := authz.IdentityFromCert(leaf)
	if err != nil {
		t.Fatal(err)
	}
	if id.User != "alice" || id.Device != "laptop" {
		t.Errorf("identity %+v", id)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ts.PKI.Root)
	inter := x509.NewCertPool()
	for _, c := range creds.Chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatal(err)
	}
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "Solving challenge") {
		t.Errorf("progress lines %q", lines)
	}
	// The device can ask the server about itself; the answer carries the groups.
	who, err := login.Whoami(ctx, ts.HC, ts.URL, "alice@laptop", devKey)
	if err != nil {
		t.Fatal(err)
	}
	if who.User != "alice" || len(who.Groups) != 1 || who.Groups[0] != "dev" || who.Revoked || who.LastLogin.IsZero() {
		t.Errorf("whoami: %+v", who)
	}
	// Somebody without the device key cannot.
	var se *login.ServerError
	if _, err := login.Whoami(ctx, ts.HC, ts.URL, "alice@laptop", newKey(t)); !errors.As(err, &se) || se.Status != http.StatusForbidden {
		t.Errorf("whoami signed by another key: %v", err)
	}
	// A second login works too (every login mints a fresh EAB key and key pair).
	creds2, err := login.Login(ctx, ts.HC, ts.URL, "alice@laptop", devKey, nil)
	if err != nil {
		t.Fatal(err)
	}
	if creds2.Key.Equal(creds.Key) {
		t.Error("second login reused the key")
	}
}

func TestFetchRootWrongFingerprint(t *testing.T) {
	ts := newTestServer(t)
	other, err := Bootstrap(t.TempDir(), "other")
	if err != nil {
		t.Fatal(err)
	}
	_, err = login.FetchRoot(context.Background(), ts.URL, other.Fingerprint())
	if err == nil || !strings.Contains(err.Error(), "refusing it") {
		t.Fatalf("wrong fingerprint: err = %v", err)
	}
}

func TestEnrollBadTokens(t *testing.T) {
	ts := newTestServer(t)
	ctx := context.Background()
	// Unknown token.
	_, err := login.EnrollDevice(ctx, ts.HC, ts.URL, "no-such-token", newKey(t))
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusUnauthorized || !strings.Contains(se.Message, "tpd enroll") {
		t.Fatalf("unknown token: %v", err)
	}
	// Reused token.
	enr, err := ts.Users.Enroll("bob", "phone", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := login.EnrollDevice(ctx, ts.HC, ts.URL, enr.Token, newKey(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := login.EnrollDevice(ctx, ts.HC, ts.URL, enr.Token, newKey(t)); !errors.As(err, &se) || se.Status != http.StatusUnauthorized {
		t.Fatalf("reused token: %v", err)
	}
	// Expired token.
	enr, err = ts.Users.Enroll("bob", "tablet", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ts.skew.Store(int64(time.Hour + time.Second))
	if _, err := login.EnrollDevice(ctx, ts.HC, ts.URL, enr.Token, newKey(t)); !errors.As(err, &se) || se.Status != http.StatusUnauthorized {
		t.Fatalf("expired token: %v", err)
	}
}

// A login signed by a key other than the enrolled device key gets no attestation.
func TestLoginWithWrongDeviceKey(t *testing.T) {
	ts := newTestServer(t)
	ctx := context.Background()
	enr, _ := ts.Users.Enroll("carol", "laptop", nil, time.Hour)
	carolKey := newKey(t)
	if _, err := login.EnrollDevice(ctx, ts.HC, ts.URL, enr.Token, carolKey); err != nil {
		t.Fatal(err)
	}
	_, err := login.Login(ctx, ts.HC, ts.URL, "carol@laptop", newKey(t), nil)
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusForbidden {
		t.Fatalf("wrong device key: %v", err)
	}
	wrongKey := strings.ReplaceAll(se.Message, "carol@laptop", "ID")
	// An unknown device is refused with a sentence naming what to do, and the same
	// sentence as a wrong key: the answer does not tell which device IDs exist.
	_, err = login.Login(ctx, ts.HC, ts.URL, "nobody@nowhere", newKey(t), nil)
	if !errors.As(err, &se) || !strings.Contains(se.Message, "tpd enroll") {
		t.Fatalf("unknown device: %v", err)
	}
	if unknown := strings.ReplaceAll(se.Message, "nobody@nowhere", "ID"); unknown != wrongKey {
		t.Errorf("unknown device and wrong key answer differently:\n%s\n%s", unknown, wrongKey)
	}
	// A revoked device is refused.
	if err := ts.Users.RevokeDevice("carol@laptop"); err != nil {
		t.Fatal(err)
	}
	if _, err := login.Login(ctx, ts.HC, ts.URL, "carol@laptop", carolKey, nil); !errors.As(err, &se) || !strings.Contains(se.Message, "revoked") {
		t.Fatalf("revoked device: %v", err)
	}
}

// Malformed enrollment bodies are refused before any state changes.
func TestEnrollMalformed(t *testing.T) {
	ts := newTestServer(t)
	for name, body := range map[string]string{
		"not json":      "{",
		"unknown field": `{"token":"x","public_key":"","signature":"","extra":1}`,
		"trailing data": `{"token":"x","public_key":"","signature":""} {}`,
		"bad key":       `{"token":"x","public_key":"AAAA","signature":""}`,
	} {
		resp, err := ts.HC.Post(ts.URL+login.PathEnroll, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", name, resp.StatusCode)
		}
	}
}
