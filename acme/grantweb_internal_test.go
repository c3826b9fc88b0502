package acme

import (
	"crypto/sha256"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// Approvals under way on the website are bounded in number and in time, and
// bound to the browser that started them. Bad input: one more than the bound
// at once; the cookie of another browser; an answer after the approval's
// time; the same state taken twice.
func TestWebGrantsBounds(t *testing.T) {
	var ws webGrants
	now := time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC)
	withCookie := func(v string) *http.Request {
		r := httptest.NewRequest(http.MethodGet, "/grant/signed-in", nil)
		r.AddCookie(&http.Cookie{Name: webGrantCookie, Value: v})
		return r
	}
	var first string
	for i := range maxWebGrants {
		state, ok := ws.add(&webGrant{browser: sha256.Sum256([]byte("mine")), expires: now.Add(webGrantTTL)}, now)
		if !ok {
			t.Fatalf("approval %d of %d refused", i+1, maxWebGrants)
		}
		if i == 0 {
			first = state
		}
	}
	if _, ok := ws.add(&webGrant{expires: now.Add(webGrantTTL)}, now); ok {
		t.Fatalf("approval %d accepted beyond the bound", maxWebGrants+1)
	}
	if _, ok := ws.get(withCookie("another browser's"), first, now, false); ok {
		t.Fatal("another browser's cookie got the approval")
	}
	if _, ok := ws.get(httptest.NewRequest(http.MethodGet, "/grant/signed-in", nil), first, now, false); ok {
		t.Fatal("a request without the cookie got the approval")
	}
	if _, ok := ws.get(withCookie("mine"), first, now, true); !ok {
		t.Fatal("the browser that started the approval did not get it")
	}
	if _, ok := ws.get(withCookie("mine"), first, now, true); ok {
		t.Fatal("an approval taken once was taken again")
	}
	// Past their time, every approval is gone and makes room.
	later := now.Add(webGrantTTL + time.Second)
	if _, ok := ws.add(&webGrant{expires: later.Add(webGrantTTL)}, later); !ok {
		t.Fatal("a new approval was refused once the others expired")
	}
	if n := len(ws.m); n != 1 {
		t.Fatalf("%d approvals kept after the others expired, want 1", n)
	}
}
