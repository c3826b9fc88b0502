package acme

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testidp"
)

// fuzzPaths are the enrollment endpoints that read a request body; the fuzzer
// picks one by index.
var fuzzPaths = []string{login.PathEnroll, login.PathAttest, login.PathWhoami, login.PathReverseChallenge, login.PathReverseAccount, login.PathEnrollSSO}

// FuzzEnrollmentBodies: any request body, from anyone, to the endpoints that a
// device without a certificate reaches (enrollment, attestation, whoami, the
// reverse-name endpoints and enrollment by single sign-on, with a real
// identity provider on loopback), against the real embedded CA and user
// store. Every answer is JSON; a refusal is a 4xx with a sentence, never a
// 5xx; and a 200 is only ever given to a request signed by the enrolled
// device's key (or, for enrollment, carrying the token the administrator
// issued; no input can carry an ID token the provider issued, so single
// sign-on never answers 200).
func FuzzEnrollmentBodies(f *testing.F) {
	dir := f.TempDir()
	pki, err := Bootstrap(filepath.Join(dir, "ca"), "fuzz")
	if err != nil {
		f.Fatal(err)
	}
	ca, err := NewCA(pki, CAOptions{DBPath: DBPath(dir)})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ca.Close() })
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	st, err := users.Open(filepath.Join(dir, "users.json"), users.WithClock(func() time.Time { return now }))
	if err != nil {
		f.Fatal(err)
	}
	enr := &Enroller{PKI: pki, CA: ca, Users: st, Now: func() time.Time { return now },
		ReverseOwner: func(host string) (string, bool) { return "alice@laptop", host == "laptop-ssh.rev.tp.internal" }}
	idp := testidp.Start(f, testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true})
	enr.SSO = &SSO{Issuer: idp.Issuer, ClientID: testidp.ClientID, Domain: "example.org"}
	h := enr.Handler()

	post := func(path, ctype string, body []byte) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body))
		if ctype != "" {
			req.Header.Set("Content-Type", ctype)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		return w
	}
	mustJSON := func(v any) []byte {
		b, err := json.Marshal(v)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	genKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			f.Fatal(err)
		}
		return k
	}
	pubB64 := func(k *ecdsa.PrivateKey) string {
		der, err := x509.MarshalPKIXPublicKey(k.Public())
		if err != nil {
			f.Fatal(err)
		}
		return base64.StdEncoding.EncodeToString(der)
	}
	sign := func(k *ecdsa.PrivateKey, msg []byte) string {
		s, err := login.SignMessage(k, msg)
		if err != nil {
			f.Fatal(err)
		}
		return s
	}

	// Enroll alice@laptop for real; her key signs the seeds below.
	enrollment, err := st.Enroll("alice", "laptop", []string{"dev"}, time.Hour)
	if err != nil {
		f.Fatal(err)
	}
	devKey := genKey()
	enrollBody := mustJSON(login.EnrollRequest{Token: enrollment.Token, PublicKey: pubB64(devKey),
		Signature: sign(devKey, login.EnrollMessage(enrollment.Token, pubB64(devKey)))})
	if w := post(login.PathEnroll, "application/json", enrollBody); w.Code != http.StatusOK {
		f.Fatalf("enrollment of the seed device: %d %s", w.Code, w.Body)
	}
	spare, err := st.Enroll("alice", "phone", nil, time.Hour) // left for the fuzzer to find
	if err != nil {
		f.Fatal(err)
	}
	ts := now.Format(time.RFC3339)
	loginKey := genKey()
	f.Add(uint8(0), true, enrollBody)
	f.Add(uint8(0), true, mustJSON(login.EnrollRequest{Token: spare.Token, PublicKey: pubB64(loginKey),
		Signature: sign(loginKey, login.EnrollMessage(spare.Token, pubB64(loginKey)))}))
	f.Add(uint8(1), true, mustJSON(login.AttestRequest{DeviceID: "alice@laptop", PublicKey: pubB64(loginKey), Time: ts,
		Signature: sign(devKey, login.AttestMessage("alice@laptop", pubB64(loginKey), ts))}))
	f.Add(uint8(2), true, mustJSON(login.WhoamiRequest{DeviceID: "alice@laptop", Time: ts,
		Signature: sign(devKey, login.WhoamiMessage("alice@laptop", ts))}))
	f.Add(uint8(3), true, mustJSON(login.ReverseChallengeRequest{DeviceID: "alice@laptop", Name: "laptop-ssh.rev.tp.internal", Value: "digest", Time: ts,
		Signature: sign(devKey, login.ReverseChallengeMessage("alice@laptop", "laptop-ssh.rev.tp.internal", "digest", ts))}))
	f.Add(uint8(4), true, mustJSON(login.ReverseAccountRequest{DeviceID: "alice@laptop", Name: "laptop-ssh.rev.tp.internal", Time: ts,
		Signature: sign(devKey, login.ReverseAccountMessage("alice@laptop", "laptop-ssh.rev.tp.internal", ts))}))
	fakeJWT := "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln"
	f.Add(uint8(5), true, mustJSON(login.EnrollSSORequest{IDToken: fakeJWT, Device: "laptop", PublicKey: pubB64(loginKey),
		Signature: sign(loginKey, login.EnrollSSOMessage(fakeJWT, "laptop", pubB64(loginKey)))}))
	f.Add(uint8(1), true, []byte(`{"device_id":"alice@laptop","public_key":"AAAA","time":"x","signature":""}`))
	f.Add(uint8(2), false, []byte(`{}`))
	f.Add(uint8(0), true, []byte(`{"token":"x","public_key":"","signature":""} {}`))
	f.Add(uint8(0), true, []byte(`{"token":"x","extra":1}`))
	f.Add(uint8(3), true, []byte(`[`))

	devPub := &devKey.PublicKey
	signedBy := func(pub *ecdsa.PublicKey, msg []byte, sigB64 string) bool {
		sig, err := base64.StdEncoding.DecodeString(sigB64)
		if err != nil {
			return false
		}
		sum := sha256.Sum256(msg)
		return ecdsa.VerifyASN1(pub, sum[:], sig)
	}
	f.Fuzz(func(t *testing.T, which uint8, isJSON bool, body []byte) {
		path := fuzzPaths[int(which)%len(fuzzPaths)]
		ctype := "text/plain"
		if isJSON {
			ctype = "application/json"
		}
		w := post(path, ctype, body)
		if ct := w.Header().Get("Content-Type"); ct != "application/json" {
			t.Fatalf("%s: answer of type %q", path, ct)
		}
		if w.Code != http.StatusOK {
			var e login.ErrorResponse
			if w.Code >= 500 || w.Code < 400 {
				t.Fatalf("%s %q: status %d (%s); a bad request is the client's error", path, body, w.Code, w.Body)
			}
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Error == "" {
				t.Fatalf("%s: refusal %d without a reason: %q", path, w.Code, w.Body)
			}
			return
		}
		// A 200: the request must carry the device's signature (or the token).
		var ok bool
		switch path {
		case login.PathEnroll:
			var r login.EnrollRequest
			ok = json.Unmarshal(body, &r) == nil && (r.Token == enrollment.Token || r.Token == spare.Token)
		case login.PathAttest:
			var r login.AttestRequest
			ok = json.Unmarshal(body, &r) == nil && r.DeviceID == "alice@laptop" &&
				signedBy(devPub, login.AttestMessage(r.DeviceID, r.PublicKey, r.Time), r.Signature)
		case login.PathWhoami:
			var r login.WhoamiRequest
			ok = json.Unmarshal(body, &r) == nil && r.DeviceID == "alice@laptop" &&
				signedBy(devPub, login.WhoamiMessage(r.DeviceID, r.Time), r.Signature)
		case login.PathReverseChallenge:
			var r login.ReverseChallengeRequest
			ok = json.Unmarshal(body, &r) == nil && r.DeviceID == "alice@laptop" &&
				signedBy(devPub, login.ReverseChallengeMessage(r.DeviceID, r.Name, r.Value, r.Time), r.Signature)
		case login.PathReverseAccount:
			var r login.ReverseAccountRequest
			ok = json.Unmarshal(body, &r) == nil && r.DeviceID == "alice@laptop" &&
				signedBy(devPub, login.ReverseAccountMessage(r.DeviceID, r.Name, r.Time), r.Signature)
		}
		if !ok {
			t.Fatalf("%s granted a request not signed by the device: %q", path, body)
		}
	})
}
