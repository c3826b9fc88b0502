package login

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"net"
	"net/http"
	"strings"
	"time"

	"golang.org/x/oauth2"
)

// ErrNoBrowser is a sign-in that cannot go through a browser on this machine:
// the provider offers no authorization endpoint, or the browser did not start.
// The device authorization grant (SignIn) is the way then.
var ErrNoBrowser = errors.New("no browser sign-in")

// callbackPath is where the provider sends the browser back to dlogin.
const callbackPath = "/callback"

// SignInBrowser signs a person in with the provider by the authorization code
// flow in their browser (OpenID Connect with PKCE, RFC 7636), returning to a
// loopback address of this machine (RFC 8252): open is given the provider's
// page to show, and SignInBrowser waits (until ctx ends) for the browser to
// come back, exchanges the code with its verifier and returns the ID token.
// The loopback answers only its own sign-in (state), and the ID token must
// carry this sign-in's nonce. idp reaches the provider. An error wrapping
// ErrNoBrowser says to sign in with a code instead (SignIn).
func SignInBrowser(ctx context.Context, idp *http.Client, info SSOInfo, open func(url string) error) (Tokens, error) {
	meta, err := providerMetadata(ctx, idp, info.Issuer)
	if err != nil {
		return Tokens{}, err
	}
	if meta.AuthEndpoint == "" {
		return Tokens{}, fmt.Errorf("%w: the identity provider %s names no authorization endpoint", ErrNoBrowser, info.Issuer)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return Tokens{}, fmt.Errorf("%w: cannot listen on loopback for the provider's answer: %v", ErrNoBrowser, err)
	}
	cfg := &oauth2.Config{ClientID: info.ClientID, Scopes: info.Scopes,
		RedirectURL: "http://" + ln.Addr().String() + callbackPath,
		Endpoint:    oauth2.Endpoint{AuthURL: meta.AuthEndpoint, TokenURL: meta.TokenEndpoint, AuthStyle: oauth2.AuthStyleInParams}}
	state, nonce, verifier := randomToken(), randomToken(), oauth2.GenerateVerifier()
	page := cfg.AuthCodeURL(state, oauth2.S256ChallengeOption(verifier), oauth2.SetAuthURLParam("nonce", nonce))

	back := make(chan callback, 1)
	srv := &http.Server{Handler: callbackHandler(state, info.Issuer, back),
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second,
		MaxHeaderBytes: 16 << 10}
	go func() { _ = srv.Serve(ln) }()
	defer func() { // the browser's last page is written before the loopback closes
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		if srv.Shutdown(sctx) != nil {
			_ = srv.Close()
		}
	}()
	var cb callback
	answered := false
	if err := open(page); err != nil {
		select {
		case cb = <-back: // the browser failed after the sign-in came back
			answered = true
		default:
			return Tokens{}, fmt.Errorf("%w: the browser did not start: %v", ErrNoBrowser, err)
		}
	}
	if !answered {
		select {
		case cb = <-back:
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return Tokens{}, errors.New("the browser did not come back from the identity provider in time: run dlogin --sso again, or dlogin --sso --no-browser to sign in with a code")
			}
			return Tokens{}, fmt.Errorf("waiting for the browser to come back from the identity provider: %w", ctx.Err())
		}
	}
	switch {
	case cb.err == "access_denied":
		return Tokens{}, errors.New("the sign-in was declined at the identity provider; nothing was enrolled")
	case cb.err != "":
		if cb.desc != "" {
			return Tokens{}, fmt.Errorf("the identity provider %s ended the sign-in: %s: %s", info.Issuer, cb.err, cb.desc)
		}
		return Tokens{}, fmt.Errorf("the identity provider %s ended the sign-in: %s", info.Issuer, cb.err)
	}
	tok, err := cfg.Exchange(context.WithValue(ctx, oauth2.HTTPClient, idp), cb.code, oauth2.VerifierOption(verifier))
	if err != nil {
		return Tokens{}, fmt.Errorf("the identity provider %s did not complete the sign-in: %w", info.Issuer, explainOAuth(err))
	}
	t, err := tokensOf(tok, info)
	if err != nil {
		return Tokens{}, err
	}
	if got := TokenNonce(t.IDToken); got != nonce {
		return Tokens{}, fmt.Errorf("the identity provider %s answered with an ID token of another sign-in (its nonce is not this one's): refusing it", info.Issuer)
	}
	return t, nil
}

// callback is what the browser brought back: a code, or the provider's error.
type callback struct{ code, err, desc string }

// callbackHandler serves the loopback redirect: the first answer to this
// sign-in (state) goes to back; an answer for another sign-in, or none,
// gets 400 and the wait goes on.
func callbackHandler(state, issuer string, back chan<- callback) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != callbackPath {
			http.NotFound(w, r)
			return
		}
		q := r.URL.Query()
		if subtle.ConstantTimeCompare([]byte(q.Get("state")), []byte(state)) != 1 {
			writePage(w, http.StatusBadRequest, "This answer is not for the sign-in dlogin is waiting for",
				"Its state does not match. Go back to the terminal: dlogin still waits for the sign-in it opened.")
			return
		}
		cb := callback{code: q.Get("code"), err: q.Get("error"), desc: q.Get("error_description")}
		if cb.code == "" && cb.err == "" {
			writePage(w, http.StatusBadRequest, "The identity provider sent no code", "Go back to the terminal and run dlogin --sso again.")
			return
		}
		select {
		case back <- cb:
		default:
			writePage(w, http.StatusConflict, "This sign-in is already answered", "Go back to the terminal.")
			return
		}
		if cb.err != "" {
			writePage(w, http.StatusOK, "The sign-in did not complete", "The identity provider "+issuer+" said: "+strings.TrimSpace(cb.err+" "+cb.desc)+". Go back to the terminal.")
			return
		}
		writePage(w, http.StatusOK, "Signed in", "dlogin is enrolling this device. You can close this tab and go back to the terminal.")
	})
}

func writePage(w http.ResponseWriter, status int, title, text string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	fmt.Fprintf(w, "<!doctype html><title>TP: %s</title><h1>%s</h1><p>%s</p>\n",
		html.EscapeString(title), html.EscapeString(title), html.EscapeString(text))
}

// randomToken is 32 random bytes, base64url.
func randomToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// TokenNonce reads the nonce claim of a JWT without verifying it (tpd
// verifies the token; this only ties it to this sign-in).
func TokenNonce(jwt string) string {
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return ""
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return ""
	}
	var c struct {
		Nonce string `json:"nonce"`
	}
	if json.Unmarshal(payload, &c) != nil {
		return ""
	}
	return c.Nonce
}
