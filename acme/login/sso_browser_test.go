package login

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testidp"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// browse plays the person's browser: it opens the page and follows every
// redirect (the provider's sign-in page, then dlogin's loopback), and reports
// the last answer's status.
func browse(t *testing.T, page string) <-chan int {
	t.Helper()
	status := make(chan int, 1)
	go func() {
		resp, err := http.Get(page)
		if err != nil {
			t.Errorf("the browser at %s: %v", page, err)
			status <- 0
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		status <- resp.StatusCode
	}()
	return status
}

func browserInfo(idp *testidp.IdP) SSOInfo {
	return SSOInfo{Issuer: idp.Issuer, ClientID: testidp.ClientID, Scopes: []string{"openid", "email", "profile"}}
}

// claims reads an ID token's payload (the test trusts the provider it ran).
func claims(t *testing.T, jwt string) map[string]any {
	t.Helper()
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %q", jwt)
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var c map[string]any
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// A person whose browser is signed in at the provider comes back to dlogin's
// loopback address with a code; dlogin exchanges it with its PKCE verifier
// and has the person's ID token, issued to TP, carrying this sign-in's nonce.
// The page dlogin opens asks for S256 PKCE and names a loopback redirect.
func TestSignInBrowser(t *testing.T) {
	t.Parallel()
	idp := testidp.Start(t, testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true})
	idp.SignedIn("s-alice")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var opened *url.URL
	var landed <-chan int
	id, err := SignInBrowser(ctx, http.DefaultClient, browserInfo(idp), func(page string) error {
		u, err := url.Parse(page)
		if err != nil {
			return err
		}
		opened = u
		landed = browse(t, page)
		return nil
	})
	if err != nil {
		t.Fatalf("SignInBrowser: %v", err)
	}
	q := opened.Query()
	if q.Get("code_challenge_method") != "S256" || q.Get("code_challenge") == "" || q.Get("nonce") == "" || q.Get("state") == "" {
		t.Errorf("the provider's page %s asks for no S256 PKCE, nonce or state", opened)
	}
	if r := q.Get("redirect_uri"); !strings.HasPrefix(r, "http://127.0.0.1:") || !strings.HasSuffix(r, callbackPath) {
		t.Errorf("redirect_uri %q; want a loopback address of this machine (RFC 8252)", r)
	}
	c := claims(t, id.IDToken)
	if c["email"] != "alice@example.org" || c["sub"] != "s-alice" || c["aud"] == nil {
		t.Errorf("the ID token's claims %v; want alice's", c)
	}
	if s := <-landed; s != http.StatusOK {
		t.Errorf("the browser's last page answered %d; want 200 (signed in)", s)
	}
}

// The bad input: an answer on the loopback that is not this sign-in's (a
// page of another site sends the browser to dlogin's port with a code of its
// own) gets 400 and changes nothing; the real answer that follows signs in.
func TestSignInBrowserIgnoresAnotherState(t *testing.T) {
	t.Parallel()
	idp := testidp.Start(t, testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true})
	idp.SignedIn("s-alice")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	id, err := SignInBrowser(ctx, http.DefaultClient, browserInfo(idp), func(page string) error {
		u, _ := url.Parse(page)
		forged := u.Query().Get("redirect_uri") + "?code=forged&state=not-this-one"
		resp, err := http.Get(forged)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("a forged answer (another state) got %d; want 400", resp.StatusCode)
		}
		browse(t, page)
		return nil
	})
	if err != nil {
		t.Fatalf("SignInBrowser after a forged answer: %v", err)
	}
	if c := claims(t, id.IDToken); c["sub"] != "s-alice" {
		t.Fatalf("signed in as %v; want s-alice", c["sub"])
	}
}

// The bad inputs at the provider's end: nobody is signed in there (it sends
// the browser back with an error), the browser does not start, the browser
// never comes back. Each ends with a sentence that says what to do, and none
// enrols anything.
func TestSignInBrowserFailures(t *testing.T) {
	t.Parallel()
	idp := testidp.Start(t, testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true})
	info := browserInfo(idp)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := SignInBrowser(ctx, http.DefaultClient, info, func(page string) error { browse(t, page); return nil })
	if err == nil || !strings.Contains(err.Error(), "ended the sign-in: interaction_required") {
		t.Errorf("nobody signed in at the provider: %v; want the provider's error", err)
	}

	_, err = SignInBrowser(ctx, http.DefaultClient, info, func(string) error { return errors.New("xdg-open: not found") })
	if !errors.Is(err, ErrNoBrowser) || !strings.Contains(err.Error(), "xdg-open: not found") {
		t.Errorf("a browser that did not start: %v; want ErrNoBrowser with the cause", err)
	}

	wait := &expiring{Context: context.Background(), done: make(chan struct{})}
	_, err = SignInBrowser(wait, http.DefaultClient, info, func(string) error { close(wait.done); return nil })
	if err == nil || !strings.Contains(err.Error(), "dlogin --sso --no-browser") {
		t.Errorf("a browser that never came back: %v; want the way to sign in with a code", err)
	}
}

// expiring is a context whose deadline passes when done is closed: the wait
// for the browser runs out at a moment the test chooses.
type expiring struct {
	context.Context
	done chan struct{}
}

func (e *expiring) Done() <-chan struct{} { return e.done }
func (e *expiring) Err() error {
	select {
	case <-e.done:
		return context.DeadlineExceeded
	default:
		return nil
	}
}

// The bad input: the provider is down (nothing listens at its issuer). Both
// ways to sign in say so in a sentence that names it, before any page opens.
func TestSignInProviderDown(t *testing.T) {
	t.Parallel()
	info := SSOInfo{Issuer: "http://" + testnet.Refusing(t), ClientID: testidp.ClientID, Scopes: []string{"openid"}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := SignInBrowser(ctx, http.DefaultClient, info, func(string) error {
		t.Error("a page was opened for a provider that is down")
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "cannot reach the identity provider "+info.Issuer) {
		t.Errorf("browser sign-in, provider down: %v; want a sentence naming the provider", err)
	}
	_, err = SignIn(ctx, http.DefaultClient, info, func(DeviceCode) { t.Error("a code was shown for a provider that is down") })
	if err == nil || !strings.Contains(err.Error(), "cannot reach the identity provider "+info.Issuer) {
		t.Errorf("sign-in with a code, provider down: %v; want a sentence naming the provider", err)
	}
}

// A sign-in that asks for offline_access gets a refresh token; Refresh turns
// it into a fresh ID token of the same person without anyone at a browser.
// The bad input: the person was disabled at the provider, which refuses the
// refresh token: ErrSignInEnded, so that dlogin signs them in again and tp
// says to.
func TestRefresh(t *testing.T) {
	t.Parallel()
	idp := testidp.Start(t, testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true})
	info := browserInfo(idp)
	info.Scopes = append(info.Scopes, "offline_access")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var approveErr error
	first, err := SignIn(ctx, http.DefaultClient, info, func(c DeviceCode) { approveErr = idp.Approve(ctx, c.Code, "s-alice") })
	if err != nil || approveErr != nil {
		t.Fatalf("sign-in: %v %v", err, approveErr)
	}
	if first.RefreshToken == "" {
		t.Fatal("a sign-in with offline_access got no refresh token")
	}
	again, err := Refresh(ctx, http.DefaultClient, info, first.RefreshToken)
	if err != nil {
		t.Fatalf("Refresh: %v", err)
	}
	if c := claims(t, again.IDToken); c["sub"] != "s-alice" || again.IDToken == first.IDToken || again.RefreshToken == "" {
		t.Fatalf("the refreshed sign-in: sub %v, new token %v, refresh token kept %v", c["sub"], again.IDToken != first.IDToken, again.RefreshToken != "")
	}
	idp.Disable("s-alice")
	_, err = Refresh(ctx, http.DefaultClient, info, again.RefreshToken)
	if !errors.Is(err, ErrSignInEnded) {
		t.Fatalf("Refresh for a person disabled at the provider: %v; want ErrSignInEnded", err)
	}
}
