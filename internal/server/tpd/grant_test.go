package tpd

import (
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
	key := []byte("the application's key, as DER")
	q := url.Values{"name": {"ci"}, "app": {`<script>alert(1)</script>`}, "key": {base64.RawURLEncoding.EncodeToString(key)}}
	r := httptest.NewRequest(http.MethodGet, "https://tp.example.org"+login.PathGrantPage+"?"+q.Encode(), nil)
	w := httptest.NewRecorder()
	grantPage(w, r)
	body := w.Body.String()
	if w.Code != http.StatusOK || !strings.Contains(body, "keep <b>ci</b> exposed") || !strings.Contains(body, login.GrantCode(key)) ||
		!strings.Contains(body, "tp grant &#39;https://tp.example.org/grant?") {
		t.Fatalf("the grant page (%d):\n%s", w.Code, body)
	}
	if strings.Contains(body, "<script>") || !strings.Contains(body, "&lt;script&gt;") {
		t.Fatalf("the application's name was not written as text:\n%s", body)
	}
	if csp := w.Header().Get("Content-Security-Policy"); csp != "default-src 'none'" {
		t.Fatalf("Content-Security-Policy %q", csp)
	}
	r = httptest.NewRequest(http.MethodGet, "https://tp.example.org"+login.PathGrantPage+"?name=ci", nil)
	w = httptest.NewRecorder()
	grantPage(w, r)
	if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "copy the whole link") {
		t.Fatalf("a link without its key (%d):\n%s", w.Code, w.Body.String())
	}
}
