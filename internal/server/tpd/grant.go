package tpd

import (
	"context"
	"errors"
	"html/template"
	"net/http"
	"strings"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

// Grants (acme/grant.go, docs/EXPOSE.md): a person approves, from an enrolled
// device, an application's request for a credential that keeps one reverse
// name exposed. The approval needs the policy to let the person keep that
// name exposed themselves (action listen); the granted device, of the
// person's user, is then scoped to it (authz.Scope), and the policy decides
// its requests with its own identity.

// mayExpose asks the policy whether id may keep label exposed (listen).
// Public exposure is decided port by port when the application asks for it,
// with the granted device's identity.
func (d *Daemon) mayExpose(ctx context.Context, id authz.Identity, label string, _ bool) (bool, string) {
	ok, why := d.mayListen(ctx, id, label)
	switch {
	case !ok && why == "":
		return false, "the policy could not be evaluated, so nothing was granted; tell the TP administrator"
	case !ok:
		return false, "the policy does not let " + id.DeviceID + " keep " + label + " exposed, so it cannot grant that to an application: " + why
	}
	return true, ""
}

// mayListen asks the policy whether id may keep label exposed (listen): the
// policy's reason when not, "" when it could not be evaluated.
func (d *Daemon) mayListen(ctx context.Context, id authz.Identity, label string) (bool, string) {
	req := authz.Request{
		Action:      authz.ActionListen,
		Identity:    id,
		Destination: authz.Destination{Host: label + "." + d.cfg.ReverseZone, Network: "tcp", Reverse: label},
		Source:      authz.Source{Address: "grant approval", Transport: "https"},
		Time:        time.Now(),
	}
	ctx, cancel := context.WithTimeout(ctx, d.cfg.PolicyTimeout)
	defer cancel()
	dec, err := d.authz.Authorize(ctx, req)
	switch {
	case err != nil:
		return false, ""
	case !dec.Allow:
		return false, dec.Reason
	}
	return true, ""
}

// mayShare asks the policy whether id may keep label exposed (listen), as
// sharing it with a guest needs.
func (d *Daemon) mayShare(ctx context.Context, id authz.Identity, label string, _ bool) (bool, string) {
	ok, why := d.mayListen(ctx, id, label)
	if !ok && why == "" {
		return false, "the policy could not be evaluated, so nothing was shared; tell the TP administrator"
	}
	if !ok {
		return false, "the policy does not let " + id.DeviceID + " keep " + label + " exposed, so it cannot share it with a guest: " + why
	}
	return true, ""
}

// deviceEnds is when the device may no longer connect, for a guest's device
// the end of its share; zero for any other (acme.CA.SetDeviceEnds).
func (d *Daemon) deviceEnds(deviceID string) time.Time {
	dev, err := d.users.Device(deviceID)
	if err != nil {
		return time.Time{} // the login's own checks refuse it
	}
	id, ok := strings.CutPrefix(dev.GrantedBy, users.ShareApprover)
	if !ok {
		return time.Time{}
	}
	sh, err := d.users.Share(id)
	if err != nil {
		return time.Unix(1, 0) // a share the store no longer has: ended
	}
	return sh.Until
}

// grantPage is what a grant link opens: what the application asks for, its
// code, and the command that approves it on an enrolled device; with signIn,
// also a link that approves it here by signing in with the organisation's
// identity provider (acme/grantweb.go). The page itself changes nothing.
func grantPage(signIn bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { serveGrantPage(w, r, signIn) }
}

func serveGrantPage(w http.ResponseWriter, r *http.Request, signIn bool) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", "default-src 'none'")
	var g login.Grant
	var err error
	if len(r.URL.RawQuery) > 4096 {
		err = errors.New("too long")
	} else {
		g, err = login.ParseGrantLink("https://" + r.Host + login.PathGrantPage + "?" + r.URL.RawQuery)
	}
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		_ = grantTemplate.Execute(w, grantView{Bad: true})
		return
	}
	how := "to the devices its agent allows (end to end)"
	if g.Public {
		how = "to the devices its agent allows and, where the policy lets it, to anyone (public ports, names, an HTTP app)"
	}
	// The command is made anew from the fields read, so that nothing of the
	// query but them reaches it: every character a shell or cmd.exe would
	// act on is percent-encoded, and the double quotes hold the & between
	// fields on both.
	v := grantView{App: g.App, Name: g.Name, How: how, Code: login.GrantCode(g.Key), Command: g.Command(), Pick: g.Pick}
	if signIn {
		_, query, _ := strings.Cut(g.Link(), "?")
		v.SignIn = login.PathGrantSignIn + "?" + query
	}
	_ = grantTemplate.Execute(w, v)
}

type grantView struct {
	Bad                           bool
	App, Name, How, Code, Command string
	SignIn                        string // the page that approves by signing in, or ""
	Pick                          bool   // the person may approve another name
}

var grantTemplate = template.Must(template.New("grant").Parse(`<!doctype html>
<title>TP: grant an application a name</title>
{{if .Bad}}<p>This grant link is incomplete: copy the whole link the application printed.</p>
{{else}}<h1>An application asks to keep {{.Name}} exposed</h1>
<p>{{if .App}}<b>{{.App}}</b>{{else}}An application that gave no name{{end}} asks for a credential that can do one thing:
keep <b>{{.Name}}</b> exposed through this TP server, {{.How}}. It cannot dial anywhere{{if not .Pick}} or expose another name{{end}}.</p>
{{if .Pick}}<p>It takes another name if you approve another: <code>--name NAME</code> on the command below, or the form after signing in.</p>
{{end}}<p>Approve only if the application shows the code <b>{{.Code}}</b>.</p>
{{if .SignIn}}<p><a id="sign-in" href="{{.SignIn}}">Sign in with your organisation's account to approve it here</a>, or run this on one of your enrolled devices:</p>
{{else}}<p>To approve, run this on one of your enrolled devices:</p>
{{end}}<pre>{{.Command}}</pre>
<p>The credential is a device of your user; <code>tp grant --list</code> lists your grants and <code>tp grant --revoke</code> ends one.</p>
{{end}}`))
