package acme

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/server/users"
)

// One name's owner cannot fill the challenge-answer store for everyone (bad input:
// the same signed answer replayed, then many distinct answers for one name).
func TestTXTStoreBoundedPerName(t *testing.T) {
	s := newTXTStore()
	for range 100 {
		if err := s.publish("_acme-challenge.a.rev.test", "same"); err != nil {
			t.Fatalf("replayed answer: %v", err)
		}
	}
	if got := s.lookup("_acme-challenge.a.rev.test"); len(got) != 1 {
		t.Fatalf("a replayed answer was stored %d times", len(got))
	}
	var err error
	for i := 0; i < 100 && err == nil; i++ {
		err = s.publish("_acme-challenge.a.rev.test", fmt.Sprint(i))
	}
	if err == nil || !strings.Contains(err.Error(), "a.rev.test") {
		t.Fatalf("one name filled the store without limit: %v", err)
	}
	if err := s.publish("_acme-challenge.b.rev.test", "x"); err != nil {
		t.Fatalf("another name is blocked: %v", err)
	}
}

// failingTXT is a TXTStore whose database is unreachable.
type failingTXT struct{}

var errNoDatabase = errors.New("dial tcp 127.0.0.1:5432: connect: connection refused")

func (failingTXT) Publish(context.Context, string, string) error { return errNoDatabase }
func (failingTXT) Lookup(context.Context, string) ([]string, error) {
	return nil, errNoDatabase
}

// With the challenge answers in a database that does not answer (bad input:
// none; the shared store is down), the owner's reverse-challenge request is
// answered 503 with a sentence saying to retry, not a 200 whose answer the CA
// would never find, and the CA's TXT lookup fails with a reason instead of
// finding nothing (the challenge stays pending with that error, and the
// agent's next attempt succeeds once the database is back).
func TestReverseChallengeWithoutTXTStore(t *testing.T) {
	dir := t.TempDir()
	pki, err := Bootstrap(filepath.Join(dir, "ca"), "test")
	if err != nil {
		t.Fatal(err)
	}
	ca, err := NewCA(pki, CAOptions{DBPath: DBPath(dir), ReverseZone: "rev.tp.internal", TXT: failingTXT{}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	st, err := users.Open(filepath.Join(dir, "users.json"))
	if err != nil {
		t.Fatal(err)
	}
	enr := &Enroller{PKI: pki, CA: ca, Users: st,
		ReverseOwner: func(host string) (string, bool) { return "alice@laptop", host == "laptop-ssh.rev.tp.internal" }}
	h := enr.Handler()
	post := func(path string, v any) *httptest.ResponseRecorder {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		req := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/json")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		return w
	}
	en, err := st.Enroll("alice", "laptop", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	key := newKey(t)
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	pub := base64.StdEncoding.EncodeToString(der)
	sig, err := login.SignMessage(key, login.EnrollMessage(en.Token, pub))
	if err != nil {
		t.Fatal(err)
	}
	if w := post(login.PathEnroll, login.EnrollRequest{Token: en.Token, PublicKey: pub, Signature: sig}); w.Code != http.StatusOK {
		t.Fatalf("enrollment: %d %s", w.Code, w.Body)
	}
	ts := time.Now().UTC().Format(time.RFC3339)
	const name, value = "laptop-ssh.rev.tp.internal", "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
	if sig, err = login.SignMessage(key, login.ReverseChallengeMessage("alice@laptop", name, value, ts)); err != nil {
		t.Fatal(err)
	}
	w := post(login.PathReverseChallenge, login.ReverseChallengeRequest{DeviceID: "alice@laptop", Name: name, Value: value, Time: ts, Signature: sig})
	if w.Code != http.StatusServiceUnavailable || !strings.Contains(w.Body.String(), "try again") || strings.Contains(w.Body.String(), "5432") {
		t.Fatalf("reverse-challenge with the store down: %d %s; want 503 saying to try again, without the database's address", w.Code, w.Body)
	}
	_, err = challengeClient{ctx: context.Background(), txt: failingTXT{}}.LookupTxt("_acme-challenge." + name)
	if err == nil || !strings.Contains(err.Error(), "try again") {
		t.Fatalf("TXT lookup with the store down: %v; want an error saying to try again", err)
	}
}
