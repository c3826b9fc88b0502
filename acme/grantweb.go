package acme

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"golang.org/x/oauth2"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

// Approving a grant on the website: the person who opens a grant link signs
// in with the organisation's identity provider instead of running tp grant
// on an enrolled device. TP's server is then the provider's client with a
// redirect to its own website (login.PathGrantSignedIn), by the
// authorization code flow with PKCE, bound to the browser that started it by
// a cookie; the page it comes back to asks to approve, and only the form on
// that page, posted by that browser, approves. The grant records the
// provider's account (users.SignInApprover): it lives as long as the user is
// bound to that account.

const (
	// webGrantTTL bounds a sign-in from the link to the approval.
	webGrantTTL = 10 * time.Minute
	// maxWebGrants bounds the sign-ins under way at once, and
	// maxWebGrantsPerSource those of one source address (an IPv6 /64): a new
	// one beyond either bound takes the place of the oldest (of that source
	// first), so that nobody can fill the table and shut the page to others.
	maxWebGrants          = 1024
	maxWebGrantsPerSource = 8
	// webGrantCookie, with the beginning of the sign-in's state, names the
	// cookie that binds a sign-in to the browser that started it: one per
	// sign-in, so that a second one in the same browser leaves the first
	// alone. __Host-: only this host sets it, for every path.
	webGrantCookie = "__Host-tp-grant-"
	// signInDevice is the device name an approval by signing in is decided
	// as: the policy sees USER@sign-in.
	signInDevice = users.SignInDevice
)

// webGrant is one approval under way on the website.
type webGrant struct {
	mine     bool   // a sign-in to list and revoke the person's grants, not to approve g
	source   string // the address (IPv6: its /64) that started it
	g        login.Grant
	scope    authz.Scope
	browser  [32]byte // SHA-256 of the cookie's secret
	verifier string   // PKCE
	nonce    string
	expires  time.Time
	person   *ssoPerson // once signed in
	form     string     // the approval form's one-time token, once signed in
}

// webGrants are the approvals under way, by the sign-in's state.
type webGrants struct {
	mu sync.Mutex
	m  map[string]*webGrant
}

// add records w under a new state: past the bounds, in the place of the
// oldest sign-in of its source, or else of the oldest of all.
func (ws *webGrants) add(w *webGrant, now time.Time) string {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if ws.m == nil {
		ws.m = map[string]*webGrant{}
	}
	var oldest, oldestHere string
	here := 0
	for k, x := range ws.m {
		if now.After(x.expires) {
			delete(ws.m, k)
			continue
		}
		if oldest == "" || x.expires.Before(ws.m[oldest].expires) {
			oldest = k
		}
		if x.source == w.source {
			here++
			if oldestHere == "" || x.expires.Before(ws.m[oldestHere].expires) {
				oldestHere = k
			}
		}
	}
	switch {
	case here >= maxWebGrantsPerSource:
		delete(ws.m, oldestHere)
	case len(ws.m) >= maxWebGrants:
		delete(ws.m, oldest)
	}
	state := secret()
	ws.m[state] = w
	return state
}

// sourceOf is the source a sign-in counts against: the client's address,
// an IPv6 one as its /64.
func sourceOf(r *http.Request) string {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	a := ap.Addr().Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.String()
	}
	return a.String()
}

// cookieName is the name of the cookie that binds the sign-in state to its
// browser.
func cookieName(state string) string {
	if len(state) > 16 {
		state = state[:16]
	}
	return webGrantCookie + state
}

// get returns (a copy of) the approval under way for state, if the browser
// holds its cookie and it has not expired; take also ends it.
func (ws *webGrants) get(r *http.Request, state string, now time.Time, take bool) (webGrant, bool) {
	c, err := r.Cookie(cookieName(state))
	if err != nil || state == "" {
		return webGrant{}, false
	}
	sum := sha256.Sum256([]byte(c.Value))
	ws.mu.Lock()
	defer ws.mu.Unlock()
	w := ws.m[state]
	if w == nil || subtle.ConstantTimeCompare(sum[:], w.browser[:]) != 1 {
		return webGrant{}, false
	}
	if take || now.After(w.expires) {
		delete(ws.m, state)
	}
	if now.After(w.expires) {
		return webGrant{}, false
	}
	return *w, true
}

// answer returns (a copy of) the signed-in approval for state and ends it,
// if the browser holds its cookie, it has not expired and form is its
// one-time form token; a wrong token leaves it as it was, so that a post
// that does not hold it cannot end someone's sign-in.
func (ws *webGrants) answer(r *http.Request, state, form string, now time.Time) (webGrant, bool) {
	c, err := r.Cookie(cookieName(state))
	if err != nil || state == "" || form == "" {
		return webGrant{}, false
	}
	sum := sha256.Sum256([]byte(c.Value))
	ws.mu.Lock()
	defer ws.mu.Unlock()
	w := ws.m[state]
	if w == nil || subtle.ConstantTimeCompare(sum[:], w.browser[:]) != 1 || w.person == nil ||
		subtle.ConstantTimeCompare([]byte(form), []byte(w.form)) != 1 {
		return webGrant{}, false
	}
	delete(ws.m, state)
	if now.After(w.expires) {
		return webGrant{}, false
	}
	return *w, true
}

// signedIn records who signed in for state and returns the approval form's
// token; false when the approval ended or someone signed in for it already.
func (ws *webGrants) signedIn(state string, p ssoPerson) (string, bool) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	w := ws.m[state]
	if w == nil || w.person != nil {
		return "", false
	}
	w.person, w.form = &p, secret()
	return w.form, true
}

// secret is 32 random bytes, base64url.
func secret() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// GrantPages serves the website's part of a grant's approval by signing in
// (login.PathGrantSignIn, PathGrantSignedIn, PathGrantApprove) on mux, when
// the Enroller has single sign-on and its URL.
func (e *Enroller) GrantPages(mux *http.ServeMux) {
	mux.HandleFunc("GET "+login.PathGrantSignIn, e.grantSignIn)
	mux.HandleFunc("GET "+login.PathGrantSignedIn, e.grantSignedIn)
	mux.HandleFunc("POST "+login.PathGrantApprove, e.grantApprove)
	mux.HandleFunc("GET "+login.PathGrantsPage, e.grantSignIn)
	mux.HandleFunc("POST "+login.PathGrantRevokePage, e.grantRevokeWeb)
	mux.HandleFunc("POST "+login.PathShareWeb, e.shareWeb)
}

// oauthConfig is TP's client at the provider for approvals on the website.
func (e *Enroller) oauthConfig(ep oauth2.Endpoint) *oauth2.Config {
	ep.AuthStyle = oauth2.AuthStyleInParams // a public client: PKCE, no secret
	scopes := slices.DeleteFunc(slices.Clone(e.SSO.Info().Scopes), func(s string) bool { return s == oidc.ScopeOfflineAccess })
	return &oauth2.Config{ClientID: e.SSO.ClientID, Scopes: scopes, Endpoint: ep, RedirectURL: e.URL + login.PathGrantSignedIn}
}

// grantSignIn starts an approval: it checks the request the link carries,
// binds the sign-in to this browser and sends it to the provider.
func (e *Enroller) grantSignIn(w http.ResponseWriter, r *http.Request) {
	if e.SSO == nil || e.URL == "" {
		webPage(w, http.StatusNotFound, "No sign-in on this server",
			"This TP server signs nobody in with an identity provider: approve the request with tp grant on one of your enrolled devices (the grant link's page shows the command).", nil)
		return
	}
	if u, err := url.Parse(e.URL); err == nil && !strings.EqualFold(u.Host, r.Host) {
		// The provider sends the browser back to e.URL, where the cookie
		// must be: go there first.
		http.Redirect(w, r, e.URL+r.URL.Path+"?"+r.URL.RawQuery, http.StatusSeeOther)
		return
	}
	mine := r.URL.Path == login.PathGrantsPage
	var g login.Grant
	var scope authz.Scope
	if !mine {
		var ok bool
		if g, scope, ok = e.webRequest(w, r); !ok {
			return
		}
	}
	ep, err := e.SSO.endpoints(r.Context())
	if err != nil || ep.AuthURL == "" {
		e.log().Warn("grant sign-in: the identity provider is unreachable", "err", err)
		webPage(w, http.StatusServiceUnavailable, "The identity provider cannot be reached",
			"TP cannot reach the organisation's identity provider right now, so nobody can sign in; try again in a minute, or approve with tp grant on an enrolled device.", nil)
		return
	}
	cookie := secret()
	wg := &webGrant{mine: mine, source: sourceOf(r), g: g, scope: scope, browser: sha256.Sum256([]byte(cookie)), verifier: oauth2.GenerateVerifier(),
		nonce: secret(), expires: e.now().Add(webGrantTTL)}
	state := e.web.add(wg, e.now())
	http.SetCookie(w, &http.Cookie{Name: cookieName(state), Value: cookie, Path: "/", MaxAge: int(webGrantTTL.Seconds()),
		Secure: true, HttpOnly: true, SameSite: http.SameSiteLaxMode})
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, e.oauthConfig(ep).AuthCodeURL(state, oauth2.S256ChallengeOption(wg.verifier), oauth2.SetAuthURLParam("nonce", wg.nonce)), http.StatusSeeOther)
}

// webRequest reads and checks the application's request from the query, as
// the grant link carries it; false when it answered with a refusal.
func (e *Enroller) webRequest(w http.ResponseWriter, r *http.Request) (login.Grant, authz.Scope, bool) {
	bad := func(msg string) (login.Grant, authz.Scope, bool) {
		webPage(w, http.StatusBadRequest, "This grant link cannot be approved", msg, nil)
		return login.Grant{}, "", false
	}
	if len(r.URL.RawQuery) > 4096 {
		return bad("The link is too long: copy the whole link the application printed, and nothing more.")
	}
	g, err := login.ParseGrantLink("https://" + r.Host + login.PathGrantPage + "?" + r.URL.RawQuery)
	if err != nil {
		return bad(err.Error() + ".")
	}
	scope, err := grantScope(g.Name, g.Public, g.Dial, g.Origin)
	if err != nil {
		return bad(err.Error() + ".")
	}
	if _, err := parseP256(base64.StdEncoding.EncodeToString(g.Key)); err != nil {
		return bad("The application's key is not one TP takes (" + err.Error() + ").")
	}
	return g, scope, true
}

// grantSignedIn is where the provider sends the browser back: the sign-in's
// code is exchanged for an ID token, which must be this sign-in's (nonce)
// and one tpd accepts, and the page asks the person to approve.
func (e *Enroller) grantSignedIn(w http.ResponseWriter, r *http.Request) {
	if e.SSO == nil || e.URL == "" {
		webPage(w, http.StatusNotFound, "No sign-in on this server", "This TP server signs nobody in with an identity provider.", nil)
		return
	}
	q := r.URL.Query()
	wg, ok := e.web.get(r, q.Get("state"), e.now(), q.Get("error") != "")
	switch {
	case !ok:
		webPage(w, http.StatusBadRequest, "This sign-in is not one this browser started",
			"It was started in another browser, it expired (after "+webGrantTTL.String()+"), or it was answered already: open the grant link again.", nil)
		return
	case q.Get("error") == "access_denied":
		webPage(w, http.StatusOK, "The sign-in was declined", "Nothing was granted.", nil)
		return
	case q.Get("error") != "":
		webPage(w, http.StatusBadGateway, "The identity provider ended the sign-in",
			"It said: "+q.Get("error")+" "+q.Get("error_description")+". Nothing was granted; open the grant link to try again.", nil)
		return
	case wg.person != nil:
		webPage(w, http.StatusConflict, "This sign-in is already answered", "Use the page it showed, or open the grant link again.", nil)
		return
	}
	p, status, msg := e.webSignIn(r.Context(), &wg, q.Get("code"))
	if status != 0 {
		e.web.get(r, q.Get("state"), e.now(), true) // a failed sign-in ends the approval
		webPage(w, status, "The sign-in cannot approve this request", msg, nil)
		return
	}
	form, ok := e.web.signedIn(q.Get("state"), p)
	if !ok {
		webPage(w, http.StatusConflict, "This sign-in is already answered", "Use the page it showed, or open the grant link again.", nil)
		return
	}
	if wg.mine {
		e.grantsPage(w, p, q.Get("state"), form)
		return
	}
	webPage(w, http.StatusOK, "Approve "+appName(wg.g.App)+"?", "", &approvalView{
		User: p.User, Email: p.Email, App: appName(wg.g.App), Name: wg.g.Name, How: grantHow(wg.g.Public), Pick: wg.g.Pick,
		Dial: wg.g.Dial, Any: wg.g.Dial && wg.g.Name == authz.AnyDestination, Origin: wg.g.Origin,
		Code: login.GrantCode(wg.g.Key), State: q.Get("state"), Form: form, Action: login.PathGrantApprove})
}

// webSignIn exchanges the sign-in's code for an ID token and reads who it
// names; a status and a sentence when it is refused.
func (e *Enroller) webSignIn(ctx context.Context, wg *webGrant, code string) (ssoPerson, int, string) {
	if code == "" {
		return ssoPerson{}, http.StatusBadRequest, "The identity provider sent no code: open the grant link again."
	}
	ep, err := e.SSO.endpoints(ctx)
	if err != nil {
		return ssoPerson{}, http.StatusServiceUnavailable, "TP cannot reach the identity provider right now; open the grant link again in a minute."
	}
	hc := e.SSO.HTTPClient
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	ctx, cancel := context.WithTimeout(ctx, ssoDiscoveryTimeout)
	defer cancel()
	tok, err := e.oauthConfig(ep).Exchange(context.WithValue(ctx, oauth2.HTTPClient, hc), code, oauth2.VerifierOption(wg.verifier))
	if err != nil {
		e.log().Info("grant sign-in: the code exchange failed", "err", err)
		return ssoPerson{}, http.StatusForbidden, "The identity provider did not complete the sign-in (its code was refused: used already, or expired): open the grant link again."
	}
	raw, _ := tok.Extra("id_token").(string)
	if raw == "" {
		return ssoPerson{}, http.StatusBadGateway, "The identity provider answered without an ID token; tell your TP administrator."
	}
	p, _, err := e.SSO.check(ctx, raw, e.now(), "the grant link")
	var refusal *ssoRefusal
	switch {
	case errors.As(err, &refusal):
		return ssoPerson{}, http.StatusForbidden, refusal.msg + "."
	case err != nil:
		return ssoPerson{}, http.StatusServiceUnavailable, "TP cannot check the sign-in with the identity provider right now; open the grant link again in a minute."
	}
	if subtle.ConstantTimeCompare([]byte(login.TokenNonce(raw)), []byte(wg.nonce)) != 1 {
		return ssoPerson{}, http.StatusForbidden, "The identity provider answered with the ID token of another sign-in; nothing was granted."
	}
	return p, 0, ""
}

// grantApprove is the answer of the page grantSignedIn showed: approve or
// decline, once, from the browser that signed in.
func (e *Enroller) grantApprove(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 4096)
	if err := r.ParseForm(); err != nil {
		webPage(w, http.StatusBadRequest, "This answer cannot be read", "Open the grant link again.", nil)
		return
	}
	wg, ok := e.web.answer(r, r.PostForm.Get("state"), r.PostForm.Get("form"), e.now())
	if !ok || wg.mine {
		webPage(w, http.StatusBadRequest, "This answer is not one this browser was asked for",
			"It comes from another browser or page, it expired, or it was given already: open the grant link again.", nil)
		return
	}
	if r.PostForm.Get("answer") != "approve" {
		e.log().Info("grant declined on the website", "user", wg.person.User, "name", wg.g.Name, "app", wg.g.App)
		webPage(w, http.StatusOK, "Declined", "Nothing was granted; the application waits until it gives up.", nil)
		return
	}
	p := *wg.person
	// The user is bound to the account (created if need be) once the policy
	// has let the approval through, as an enrolment by sign-in binds it.
	bind := func() (int, string) {
		if err := e.Users.BindUser(p.User, p.Subject); errors.Is(err, users.ErrOtherAccount) {
			return http.StatusForbidden, "TP's user " + p.User + " belongs to another account at the identity provider; ask your TP administrator (tpd users unbind)."
		} else if err != nil {
			e.log().Error("grant on the website: binding the user failed", "user", p.User, "err", err)
			return http.StatusServiceUnavailable, "The server cannot record the approval right now; open the grant link again in a minute."
		}
		return 0, ""
	}
	groups := p.Groups
	if groups == nil {
		groups = []string{} // the provider named none: the policy decides without groups
	}
	id := authz.Identity{DeviceID: authz.DeviceID(p.User, signInDevice), User: p.User, Device: signInDevice, Groups: groups}
	name, scope := wg.g.Name, wg.scope
	if picked := r.PostForm.Get("name"); wg.g.Pick && picked != "" && picked != name {
		// The application lets the person pick the name (its link's pick=1).
		sc, err := grantScope(picked, wg.g.Public, wg.g.Dial, wg.g.Origin)
		if err != nil {
			webPage(w, http.StatusBadRequest, "Nothing was granted", err.Error()+"; open the grant link again.", nil)
			return
		}
		name, scope = picked, sc
	}
	g, status, msg := e.approve(r.Context(), approval{id: id, by: users.SignInApprover + p.Subject, appKey: wg.g.Key, scope: scope,
		name: name, public: wg.g.Public, dial: wg.g.Dial, app: wg.g.App, remote: r.RemoteAddr, via: "grant approved on the website by a sign-in as " + p.Email,
		prepare: bind})
	if status != 0 {
		webPage(w, status, "Nothing was granted", msg, nil)
		return
	}
	may := "may only keep " + name + " exposed"
	if wg.g.Dial {
		may = scope.Describe()
	}
	webPage(w, http.StatusOK, "Approved", appName(wg.g.App)+" now holds "+g.ID+", which "+may+"; it goes on within seconds. "+e.URL+login.PathGrantsPage+" lists your grants and revokes them (so do tp grant --list and --revoke on an enrolled device); your TP administrator sees them all (tpd tokens).", nil)
}

func appName(app string) string {
	if app == "" {
		return "an application that gave no name"
	}
	return app
}

// grantHow says to whom a grant exposes its name.
func grantHow(public bool) string {
	if public {
		return "to the devices its agent allows and, where the policy lets it, to anyone (public ports, names, an HTTP app)"
	}
	return "to the devices its agent allows (end to end)"
}

// approvalView is the page that asks to approve.
type approvalView struct {
	User, Email, App, Name, How, Code string
	State, Form, Action               string
	Pick                              bool   // the person may pick another name
	Dial, Any                         bool   // a credential to connect (to Name, or to anything the policy allows)
	Origin                            string // … for the pages of this web origin only
}

// webPage writes one of the approval's pages: a title and a sentence, or the
// approval form. Nothing on it runs: no script, no style from elsewhere.
func webPage(w http.ResponseWriter, status int, title, text string, form *approvalView) {
	pageHeaders(w)
	w.WriteHeader(status)
	_ = webTemplate.Execute(w, struct {
		Title, Text string
		Form        *approvalView
	}{title, text, form})
}

// pageHeaders are the headers of every page of the approval: not cached,
// running nothing, posting only to this site, in no frame, telling no
// referrer.
func pageHeaders(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; form-action 'self'; frame-ancestors 'none'")
	w.Header().Set("X-Frame-Options", "DENY")
	w.Header().Set("Referrer-Policy", "no-referrer")
}

var webTemplate = template.Must(template.New("grant").Parse(`<!doctype html>
<title>TP: {{.Title}}</title>
<h1 id="title">{{.Title}}</h1>
{{with .Form}}<p id="who">Signed in as <b>{{.User}}</b> ({{.Email}}).</p>
{{if .Any}}<p><b>{{.App}}</b>{{with .Origin}}, a page of <b id="origin">{{.}}</b>,{{else}} (a page of an origin it does not name){{end}} asks for a credential of your user that can do one thing:
connect, through this TP server, to what the policy lets you connect to. It cannot expose names or open IP tunnels.</p>
{{else if .Dial}}<p><b>{{.App}}</b>{{with .Origin}}, a page of <b id="origin">{{.}}</b>,{{else}} (a page of an origin it does not name){{end}} asks for a credential of your user that can do one thing:
connect to <b>{{.Name}}</b> through this TP server. It cannot connect anywhere else or expose names.</p>
{{else if .Pick}}<p><b>{{.App}}</b> asks for a credential of your user that can do one thing:
keep one name exposed through this TP server, {{.How}}. It suggests <b>{{.Name}}</b> and takes the one you approve.
It cannot dial anywhere or expose another name.</p>
{{else}}<p><b>{{.App}}</b> asks for a credential of your user that can do one thing:
keep <b>{{.Name}}</b> exposed through this TP server, {{.How}}. It cannot dial anywhere or expose another name.</p>{{end}}
<p>Approve only if the application shows the code <b id="code">{{.Code}}</b>.</p>
<form method="post" action="{{.Action}}">
<input type="hidden" name="state" value="{{.State}}">
<input type="hidden" name="form" value="{{.Form}}">
{{if .Pick}}<p><label>Name <input id="name" name="name" value="{{.Name}}" required maxlength="63"></label></p>{{end}}
<button id="approve" name="answer" value="approve">Approve</button>
<button id="decline" name="answer" value="decline">Decline</button>
</form>
{{else}}<p id="text">{{.Text}}</p>{{end}}`))

// grantsPage lists the grants of the signed-in person's user, when the user
// is bound to that account, each with a button that revokes it.
func (e *Enroller) grantsPage(w http.ResponseWriter, p ssoPerson, state, form string) {
	v := &grantsView{User: p.User, Email: p.Email, State: state, Form: form, Action: login.PathGrantRevokePage,
		ShareAction: login.PathShareWeb, Sharing: e.SSO != nil && e.MayShare != nil && len(e.SSO.GuestDomains) > 0}
	if v.Bound = e.boundTo(p); v.Bound {
		for _, d := range e.Users.Devices(p.User) {
			// A guest's device is the guest's, listed with its share.
			if d.IsGrant() && !strings.HasPrefix(d.GrantedBy, users.ShareApprover) {
				v.Grants = append(v.Grants, e.grantInfo(d))
			}
		}
		v.Shares = e.myShares(p.User)
	}
	pageHeaders(w)
	_ = grantsTemplate.Execute(w, v)
}

// boundTo says whether p's TP user is bound to p's account at the provider:
// only then are its grants p's to see and revoke.
func (e *Enroller) boundTo(p ssoPerson) bool {
	for _, u := range e.Users.Users() {
		if u.Name == p.User {
			return u.SSOSubject != "" && u.SSOSubject == p.Subject
		}
	}
	return false
}

// mineAnswer reads a form posted from the page grantsPage showed and ends
// its sign-in: who signed in, or false once the browser was told why not.
func (e *Enroller) mineAnswer(w http.ResponseWriter, r *http.Request) (ssoPerson, bool) {
	r.Body = http.MaxBytesReader(w, r.Body, 4096)
	if err := r.ParseForm(); err != nil {
		webPage(w, http.StatusBadRequest, "This answer cannot be read", "Open "+login.PathGrantsPage+" again.", nil)
		return ssoPerson{}, false
	}
	wg, ok := e.web.answer(r, r.PostForm.Get("state"), r.PostForm.Get("form"), e.now())
	if !ok || !wg.mine {
		webPage(w, http.StatusBadRequest, "This answer is not one this browser was asked for",
			"It comes from another browser or page, it expired, or it was given already: open "+login.PathGrantsPage+" again.", nil)
		return ssoPerson{}, false
	}
	return *wg.person, true
}

// grantRevokeWeb revokes one grant of the signed-in person's user for good,
// from the page grantsPage showed, once.
func (e *Enroller) grantRevokeWeb(w http.ResponseWriter, r *http.Request) {
	p, ok := e.mineAnswer(w, r)
	if !ok {
		return
	}
	if id := r.PostForm.Get("share"); id != "" {
		if !e.boundTo(p) {
			webPage(w, http.StatusNotFound, "No such share", p.User+" has no share of that ID.", nil)
			return
		}
		sh, status, msg := e.endShare(r, p.User, "sign-in as "+p.Email, id)
		if status != 0 {
			webPage(w, status, "The share stays", msg, nil)
			return
		}
		webPage(w, http.StatusOK, "Revoked", "The share of "+sh.Name+" with "+sh.Guest+" ("+sh.ID+") ended: the guests' sessions ended, and they may no longer connect.", nil)
		return
	}
	g, err := e.Users.Device(r.PostForm.Get("grant"))
	if err != nil || g.User != p.User || !g.IsGrant() || !e.boundTo(p) {
		webPage(w, http.StatusNotFound, "No such grant", p.User+" holds no grant of that name.", nil)
		return
	}
	if !g.Revoked {
		if err := e.Users.RevokeDevice(g.ID); err != nil {
			e.log().Error("revoking a grant on the website failed", "grant", g.ID, "err", err)
			webPage(w, http.StatusServiceUnavailable, "The grant stays", "The server cannot record the revocation right now; try again in a minute.", nil)
			return
		}
		e.log().Info("grant revoked by its person on the website", "grant", g.ID, "email", p.Email, "remote", r.RemoteAddr)
		if e.GrantRevoked != nil {
			e.GrantRevoked(g, "sign-in as "+p.Email, r.RemoteAddr)
		}
	}
	webPage(w, http.StatusOK, "Revoked", g.ID+" is revoked for good: its sessions ended, and its key can never be granted again.", nil)
}

// shareWeb shares a name with a guest from the page grantsPage showed, once,
// as the signed-in person (their user bound to that account).
func (e *Enroller) shareWeb(w http.ResponseWriter, r *http.Request) {
	p, ok := e.mineAnswer(w, r)
	if !ok {
		return
	}
	hours, err := strconv.Atoi(r.PostForm.Get("hours"))
	if err != nil || hours < 1 || time.Duration(hours)*time.Hour > login.MaxShareFor {
		webPage(w, http.StatusBadRequest, "Nothing was shared", fmt.Sprintf("Give the hours the share lasts, 1 to %d; open %s again.", int(login.MaxShareFor/time.Hour), login.PathGrantsPage), nil)
		return
	}
	groups := p.Groups
	if groups == nil {
		groups = []string{}
	}
	id := authz.Identity{DeviceID: authz.DeviceID(p.User, signInDevice), User: p.User, Device: signInDevice, Groups: groups}
	req := login.ShareRequest{ID: login.NewShareID(), Name: r.PostForm.Get("name"), Guest: r.PostForm.Get("guest"),
		Until: e.now().Add(time.Duration(hours) * time.Hour).UTC().Format(time.RFC3339)}
	// The user is bound to the account (created if need be) once the policy
	// has let the share through, as an approval on the website binds it.
	bind := func() (int, string) {
		if err := e.Users.BindUser(p.User, p.Subject); errors.Is(err, users.ErrOtherAccount) {
			return http.StatusForbidden, "TP's user " + p.User + " belongs to another account at the identity provider; sign in as that account, or share from an enrolled device (tp share)."
		} else if err != nil {
			e.log().Error("share on the website: binding the user failed", "user", p.User, "err", err)
			return http.StatusServiceUnavailable, "The server cannot record the share right now; open " + login.PathGrantsPage + " again in a minute."
		}
		return 0, ""
	}
	sh, status, msg := e.makeShare(r, id, users.SignInApprover+p.Subject, req, bind)
	if status != 0 {
		webPage(w, status, "Nothing was shared", msg, nil)
		return
	}
	info := e.shareInfo(sh)
	webPage(w, http.StatusOK, "Shared", fmt.Sprintf("%s may connect to %s until %s (%s). Tell them to run dlogin --sso --server %s and then, for ssh, ssh -o ProxyCommand='tp %%h %%p' %s. %s%s lists your shares and ends them.",
		sh.Guest, info.Host, sh.Until.Format(time.RFC1123), sh.ID, e.URL, info.Host, e.URL, login.PathGrantsPage), nil)
}

// grantsView is the page that lists a person's grants and shares.
type grantsView struct {
	User, Email         string
	Grants              []login.GrantInfo
	Shares              []login.ShareInfo
	Bound, Sharing      bool // the user is bound to the account; the server lets people share
	State, Form, Action string
	ShareAction         string
}

var grantsTemplate = template.Must(template.New("grants").Parse(`<!doctype html>
<title>TP: your grants</title>
<h1 id="title">Grants of {{.User}}</h1>
<p id="who">Signed in as <b>{{.User}}</b> ({{.Email}}).</p>
{{if .Grants}}<form method="post" action="{{.Action}}">
<input type="hidden" name="state" value="{{.State}}">
<input type="hidden" name="form" value="{{.Form}}">
<table>
<tr><th>Device</th><th>Scope</th><th>Approved by</th><th>Created</th><th>State</th><th></th></tr>
{{range .Grants}}<tr><td>{{.DeviceID}}</td><td>{{.Scope}}</td><td>{{if .GrantedBy}}{{.GrantedBy}}{{else}}unknown{{end}}</td><td>{{.Created.Format "2006-01-02 15:04"}}</td>
<td>{{if .Revoked}}revoked{{else}}active{{end}}</td><td>{{if not .Revoked}}<button name="grant" value="{{.DeviceID}}">Revoke</button>{{end}}</td></tr>
{{end}}</table>
</form>
{{else}}<p id="text">No grants: {{.User}} has approved no application, or this account is not the one {{.User}} is bound to.</p>{{end}}
{{if .Bound}}<h2>Guest shares</h2>
{{if .Shares}}<form method="post" action="{{.Action}}">
<input type="hidden" name="state" value="{{.State}}">
<input type="hidden" name="form" value="{{.Form}}">
<table id="shares">
<tr><th>Share</th><th>Name</th><th>Guest</th><th>Until</th><th>State</th><th>Guests' devices</th><th></th></tr>
{{range .Shares}}<tr><td>{{.ID}}</td><td>{{.Name}}</td><td>{{.Guest}}</td><td>{{.Until.Format "2006-01-02 15:04 MST"}}</td><td>{{.State}}</td>
<td>{{range $i, $d := .Guests}}{{if $i}}, {{end}}{{$d}}{{end}}</td><td>{{if eq .State "active"}}<button name="share" value="{{.ID}}">Revoke</button>{{end}}</td></tr>
{{end}}</table>
</form>
{{else}}<p id="no-shares">No shares: {{.User}} has shared no name with a guest.</p>{{end}}{{end}}
{{if .Sharing}}<form method="post" action="{{.ShareAction}}" id="share">
<input type="hidden" name="state" value="{{.State}}">
<input type="hidden" name="form" value="{{.Form}}">
<p>Let a person outside the organisation connect to one name you expose, until the share ends. They sign in
with the identity provider (dlogin --sso) and may connect to that name and nothing else.</p>
<label>Name <input name="name" required maxlength="63" placeholder="laptop-ssh"></label>
<label>Guest <input name="guest" required maxlength="254" placeholder="bob@partner.example or @partner.example"></label>
<label>Hours <input name="hours" type="number" min="1" max="720" value="8" required></label>
<button id="share-button">Share</button>
</form>{{end}}`))
