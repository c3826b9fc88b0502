package acme

import (
	"crypto/sha256"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// Approvals under way on the website are bounded in number, per source and
// in time, and bound to the browser that started them. Bad input: one source
// starting more than its share (its oldest gives way, not the others'); more
// sources than the table holds (the oldest gives way); the cookie of another
// browser, or none; an answer after the approval's time; the same state
// taken twice.
func TestWebGrantsBounds(t *testing.T) {
	var ws webGrants
	now := time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC)
	withCookie := func(state, v string) *http.Request {
		r := httptest.NewRequest(http.MethodGet, "/grant/signed-in", nil)
		r.AddCookie(&http.Cookie{Name: cookieName(state), Value: v})
		return r
	}
	mine := sha256.Sum256([]byte("mine"))
	at := func(i int) time.Time { return now.Add(time.Duration(i) * time.Millisecond) }
	victim := ws.add(&webGrant{source: "192.0.2.1", browser: mine, expires: at(0).Add(webGrantTTL)}, at(0))
	var flood []string
	for i := 1; i <= 3*maxWebGrantsPerSource; i++ {
		flood = append(flood, ws.add(&webGrant{source: "2001:db8::/64", browser: mine, expires: at(i).Add(webGrantTTL)}, at(i)))
	}
	if _, ok := ws.get(withCookie(victim, "mine"), victim, now, false); !ok {
		t.Fatal("one source's flood pushed out another source's sign-in")
	}
	if n := len(ws.m); n != 1+maxWebGrantsPerSource {
		t.Fatalf("%d sign-ins kept, want the victim's and %d of the flood's", n, maxWebGrantsPerSource)
	}
	if _, ok := ws.get(withCookie(flood[0], "mine"), flood[0], now, false); ok {
		t.Fatal("the flood's oldest sign-in was kept past its source's bound")
	}
	if _, ok := ws.get(withCookie(flood[len(flood)-1], "mine"), flood[len(flood)-1], now, false); !ok {
		t.Fatal("the flood's newest sign-in was not kept")
	}
	for i := range maxWebGrants {
		ws.add(&webGrant{source: fmt.Sprintf("198.51.%d.%d", i/256, i%256), browser: mine, expires: at(100 + i).Add(webGrantTTL)}, at(100+i))
	}
	if n := len(ws.m); n != maxWebGrants {
		t.Fatalf("%d sign-ins kept, want the bound %d", n, maxWebGrants)
	}

	state := ws.add(&webGrant{source: "192.0.2.9", browser: mine, expires: now.Add(time.Hour)}, now)
	if _, ok := ws.get(withCookie(state, "another browser's"), state, now, false); ok {
		t.Fatal("another browser's cookie got the approval")
	}
	if _, ok := ws.get(httptest.NewRequest(http.MethodGet, "/grant/signed-in", nil), state, now, false); ok {
		t.Fatal("a request without the cookie got the approval")
	}
	if _, ok := ws.get(withCookie(state, "mine"), state, now, true); !ok {
		t.Fatal("the browser that started the approval did not get it")
	}
	if _, ok := ws.get(withCookie(state, "mine"), state, now, true); ok {
		t.Fatal("an approval taken once was taken again")
	}
	// Past their time, every approval is gone.
	later := now.Add(2 * time.Hour)
	ws.add(&webGrant{source: "192.0.2.9", expires: later.Add(webGrantTTL)}, later)
	if n := len(ws.m); n != 1 {
		t.Fatalf("%d approvals kept after the others expired, want 1", n)
	}
}

// The approval page of a grant to connect says what it allows and the
// page's origin, or that the page named none.
func TestApprovalPageOfAGrantToConnect(t *testing.T) {
	for _, tc := range []struct {
		view approvalView
		says []string
	}{
		{approvalView{App: "SSH in a browser", Name: "*", Dial: true, Any: true, Origin: "https://tp.example.org", Code: "ABCD-EFGH-IJKL-MNOP"},
			[]string{`a page of <b id="origin">https://tp.example.org</b>`, "connect, through this TP server, to what the policy lets you connect to", "cannot expose names"}},
		{approvalView{App: "a browser", Name: "laptop-ssh", Dial: true},
			[]string{"(a page of an origin it does not name)", "connect to <b>laptop-ssh</b> through this TP server", "cannot connect anywhere else"}},
	} {
		rec := httptest.NewRecorder()
		webPage(rec, http.StatusOK, "Approve "+tc.view.App+"?", "", &tc.view)
		for _, want := range tc.says {
			if !strings.Contains(rec.Body.String(), want) {
				t.Errorf("the approval page of %+v does not say %q:\n%s", tc.view, want, rec.Body.String())
			}
		}
	}
}
