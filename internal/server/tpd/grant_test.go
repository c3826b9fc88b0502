package tpd

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/acme/login"
)

// The page a grant link opens says what the application asks for, its code
// and the command that approves it, and writes what the application sent as
// text. Bad input: markup in the application's name; a link without its key.
func TestGrantPage(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	key, err := x509.MarshalPKIXPublicKey(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	// Extra fields with what cmd.exe acts on ride in the query: the command is
	// made from the fields read, so they never reach it.
	q := url.Values{"name": {"ci"}, "app": {"nightly build"}, "key": {base64.RawURLEncoding.EncodeToString(key)}}
	r := httptest.NewRequest(http.MethodGet, "https://tp.example.org"+login.PathGrantPage+"?"+q.Encode()+`&x=&\\evil.example\s\run.exe&`, nil)
	w := httptest.NewRecorder()
	serveGrantPage(w, r, false)
	body := w.Body.String()
	if w.Code != http.StatusOK || !strings.Contains(body, "keep <b>ci</b> exposed") || !strings.Contains(body, login.GrantCode(key)) ||
		!strings.Contains(body, "tp grant &#34;https://tp.example.org/grant?app=nightly&#43;build&amp;key=") {
		t.Fatalf("the grant page (%d):\n%s", w.Code, body)
	}
	if strings.Contains(body, "evil") {
		t.Fatalf("a field the page does not know reached the command:\n%s", body)
	}
	// Bad input: markup in the application's name is no name at all.
	q.Set("app", `<script>alert(1)</script>`)
	r = httptest.NewRequest(http.MethodGet, "https://tp.example.org"+login.PathGrantPage+"?"+q.Encode(), nil)
	w = httptest.NewRecorder()
	serveGrantPage(w, r, false)
	if w.Code != http.StatusBadRequest || strings.Contains(w.Body.String(), "<script>") {
		t.Fatalf("a link whose application name holds markup (%d):\n%s", w.Code, w.Body.String())
	}
	if csp := w.Header().Get("Content-Security-Policy"); csp != "default-src 'none'" {
		t.Fatalf("Content-Security-Policy %q", csp)
	}
	r = httptest.NewRequest(http.MethodGet, "https://tp.example.org"+login.PathGrantPage+"?name=ci", nil)
	w = httptest.NewRecorder()
	serveGrantPage(w, r, false)
	if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "copy the whole link") {
		t.Fatalf("a link without its key (%d):\n%s", w.Code, w.Body.String())
	}
}
