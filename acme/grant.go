package acme

import (
	"context"
	"crypto/ecdsa"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

// DefaultMaxGrants bounds the scoped devices (grants) one user holds that are
// not revoked, when Enroller.MaxGrants is zero.
const DefaultMaxGrants = 20

// grant is a person's approval, from an enrolled device, of an
// application's request (login.GrantRequest): the server creates a device of
// the person's user that holds the application's key, scoped to keeping one
// reverse name exposed (authz.Scope), once the policy lets the person keep
// that name exposed themselves.
func (e *Enroller) grant(w http.ResponseWriter, r *http.Request) {
	var req login.GrantRequest
	if !decode(w, r, &req) {
		return
	}
	scope, err := grantScope(req.Name, req.Public, req.Dial, req.Origin)
	if err != nil {
		writeErr(w, http.StatusBadRequest, err.Error())
		return
	}
	if err := checkApp(req.App); err != nil {
		writeErr(w, http.StatusBadRequest, err.Error())
		return
	}
	if _, err := parseP256(req.AppKey); err != nil {
		writeErr(w, http.StatusBadRequest, "app_key: "+err.Error())
		return
	}
	appKey, _ := base64.StdEncoding.DecodeString(req.AppKey)
	dev, ok := e.checkDevice(w, r, req.DeviceID, req.Time, req.Signature,
		login.GrantMessage(req.DeviceID, req.Time, req.AppKey, req.Name, req.Public, req.App, req.Dial, req.Origin))
	if !ok || !e.checkActive(w, dev) {
		return
	}
	if sc := e.Users.Scope(dev.ID); sc != "" {
		writeErr(w, http.StatusForbidden, fmt.Sprintf("%s is itself a scoped credential (%s) and cannot grant one; approve from a person's own device", dev.ID, sc))
		return
	}
	groups, _ := e.Users.Lookup(dev.ID)
	id := authz.Identity{DeviceID: dev.ID, User: dev.User, Device: dev.Name, Groups: groups}
	g, status, msg := e.approve(r.Context(), approval{id: id, by: dev.ID, appKey: appKey, scope: scope,
		name: req.Name, public: req.Public, dial: req.Dial, app: req.App, remote: r.RemoteAddr, via: "grant approved by " + dev.ID})
	if status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "30")
	}
	if status != 0 {
		writeErr(w, status, msg)
		return
	}
	writeJSON(w, http.StatusOK, login.GrantResponse{DeviceID: g.ID, Scope: string(g.Scope)})
}

// approval is a person's approval of an application's request, from an
// enrolled device or a sign-in on the website (grantweb.go).
type approval struct {
	id     authz.Identity // who approves, as the policy sees them
	by     string         // the approver the grant records (users.Device.GrantedBy)
	appKey []byte
	scope  authz.Scope
	name   string
	public bool
	dial   bool // a credential that may only connect (scope dial:NAME)
	app    string
	remote string
	via    string // for the audit trail
	// prepare, when set, runs once the policy let the approval through and
	// before the grant is made; a status refuses it with its sentence.
	prepare func() (status int, msg string)
}

// approve creates the grant a person approved, once the policy lets them
// keep the name exposed themselves: the device, or the HTTP status and the
// sentence of a refusal.
func (e *Enroller) approve(ctx context.Context, a approval) (users.Device, int, string) {
	if e.MayExpose == nil {
		return users.Device{}, http.StatusForbidden, "this TP server does not grant credentials to applications"
	}
	// A credential that may only connect needs no check here: the policy
	// decides each of its dials, as the person's user's.
	if !a.dial {
		if ok, reason := e.MayExpose(ctx, a.id, a.name, a.public); !ok {
			e.log().Info("grant refused", "approver", a.by, "name", a.name, "why", reason)
			return users.Device{}, http.StatusForbidden, reason
		}
	}
	if a.prepare != nil {
		if status, msg := a.prepare(); status != 0 {
			return users.Device{}, status, msg
		}
	}
	max := e.MaxGrants
	if max <= 0 {
		max = DefaultMaxGrants
	}
	g, err := e.Users.EnrollGrant(users.Grant{User: a.id.User, Device: users.GrantPrefix + strings.ToLower(strings.ReplaceAll(login.GrantCode(a.appKey), "-", "")),
		By: a.by, PublicKey: a.appKey, Scope: a.scope, Max: max, Revoked: e.deniedID})
	if err == nil && e.deniedID(g.ID) {
		err = users.ErrDeviceRevoked // revoked by tpd revoke --device (the deny list)
	}
	switch {
	case errors.Is(err, users.ErrKeyInUse):
		return g, http.StatusConflict, "this application's key belongs to another device (a grant made or revoked before, or an enrolled device); the application must make a new key and ask again"
	case errors.Is(err, users.ErrDeviceExists):
		return g, http.StatusConflict, fmt.Sprintf("%s already holds another grant for this key's code; the application should make a new key and ask again", a.id.User)
	case errors.Is(err, users.ErrDeviceRevoked):
		return g, http.StatusForbidden, "this application's key was granted before and the grant was revoked; the application must make a new key and ask again"
	case errors.Is(err, users.ErrTooManyDevices):
		return g, http.StatusForbidden, fmt.Sprintf("%s already holds %d grants, the most this server allows; revoke one no longer used (tp grant --list lists them, tp grant --revoke ends one)", a.id.User, max)
	case errors.Is(err, users.ErrUnavailable):
		e.log().Error("grant failed: the user store is unavailable", "approver", a.by, "err", err)
		return g, http.StatusServiceUnavailable, "the server cannot reach its database right now, so nothing was granted; try again in a minute"
	case err != nil:
		e.log().Error("grant failed", "approver", a.by, "err", err)
		return g, http.StatusInternalServerError, "granting failed on the server; try again or ask your administrator to check tpd's log"
	}
	e.log().Info("grant approved", "device", g.ID, "scope", string(g.Scope), "approver", a.by, "app", a.app, "remote", a.remote)
	if e.Enrolled != nil {
		e.Enrolled(g, a.remote, a.via+" for "+describeApp(a.app))
	}
	return g, 0, ""
}

// grantStatus tells an application, which proves it holds its key, whether a
// person approved it: the device that holds the key, or grant_pending.
func (e *Enroller) grantStatus(w http.ResponseWriter, r *http.Request) {
	dev, _, ok := e.grantedKey(w, r, login.GrantStatusMessage)
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, login.GrantResponse{DeviceID: dev.ID, Scope: string(e.Users.Scope(dev.ID))})
}

// grantedKey reads a request signed by an application's key (its
// message made by msg), answered to pages of any site (TP.js asks from
// one): the key, checked, and the active device a person's grant made of
// it; false when the request was answered with a refusal, grant_pending
// while no person approved the key.
func (e *Enroller) grantedKey(w http.ResponseWriter, r *http.Request, msg func(publicKey, ts string) []byte) (users.Device, *ecdsa.PublicKey, bool) {
	allowAnyOrigin(w)
	var req login.GrantStatusRequest
	if !decode(w, r, &req) {
		return users.Device{}, nil, false
	}
	pub, err := parseP256(req.PublicKey)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "public_key: "+err.Error())
		return users.Device{}, nil, false
	}
	if !verify(pub, msg(req.PublicKey, req.Time), req.Signature) {
		writeErr(w, http.StatusForbidden, "the signature does not match the key: only the application holding it may ask")
		return users.Device{}, nil, false
	}
	t, err := time.Parse(time.RFC3339, req.Time)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "time must be RFC 3339")
		return users.Device{}, nil, false
	}
	if d := e.now().Sub(t); d > maxClockSkew || d < -maxClockSkew {
		writeErr(w, http.StatusBadRequest, fmt.Sprintf("this machine's clock is off by %s; set the clock (NTP) and retry", d.Round(time.Second)))
		return users.Device{}, nil, false
	}
	der, _ := base64.StdEncoding.DecodeString(req.PublicKey)
	dev, ok := e.Users.DeviceByKey(der)
	if !ok {
		writeJSON(w, http.StatusNotFound, login.ErrorResponse{Error: "no person has approved this key yet", Code: login.CodeGrantPending})
		return users.Device{}, nil, false
	}
	if !e.checkActive(w, dev) {
		return users.Device{}, nil, false
	}
	return dev, pub, true
}

// person is the enrolled, unscoped device a signed request about its user's
// grants comes from; false when the request was answered with a refusal.
func (e *Enroller) person(w http.ResponseWriter, r *http.Request, deviceID, ts, sig string, msg []byte) (users.Device, bool) {
	dev, ok := e.checkDevice(w, r, deviceID, ts, sig, msg)
	if !ok || !e.checkActive(w, dev) {
		return dev, false
	}
	if sc := e.Users.Scope(dev.ID); sc != "" {
		writeErr(w, http.StatusForbidden, fmt.Sprintf("%s is itself a scoped credential (%s); a person's own device lists and revokes grants", dev.ID, sc))
		return dev, false
	}
	return dev, true
}

// grantInfo is what the person is told of a grant.
func (e *Enroller) grantInfo(g users.Device) login.GrantInfo {
	_, err := e.Users.Lookup(g.ID)
	denied := false
	if e.Denied != nil {
		_, denied = e.Denied(g)
	}
	return login.GrantInfo{DeviceID: g.ID, Scope: string(g.Scope), GrantedBy: g.GrantedBy, Created: g.Created,
		LastLogin: g.LastLogin, Revoked: g.Revoked || denied || errors.Is(err, authz.ErrRevoked)}
}

// grants lists the grants of the asking device's user, oldest first.
func (e *Enroller) grants(w http.ResponseWriter, r *http.Request) {
	var req login.GrantsRequest
	if !decode(w, r, &req) {
		return
	}
	dev, ok := e.person(w, r, req.DeviceID, req.Time, req.Signature, login.GrantsMessage(req.DeviceID, req.Time))
	if !ok {
		return
	}
	out := login.GrantsResponse{Grants: []login.GrantInfo{}}
	for _, d := range e.Users.Devices(dev.User) {
		if d.IsGrant() {
			out.Grants = append(out.Grants, e.grantInfo(d))
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// grantRevoke revokes one of the asking device's user's grants for good.
func (e *Enroller) grantRevoke(w http.ResponseWriter, r *http.Request) {
	var req login.GrantRevokeRequest
	if !decode(w, r, &req) {
		return
	}
	dev, ok := e.person(w, r, req.DeviceID, req.Time, req.Signature, login.GrantRevokeMessage(req.DeviceID, req.Time, req.Grant))
	if !ok {
		return
	}
	g, err := e.Users.Device(req.Grant)
	if err != nil || g.User != dev.User || !g.IsGrant() {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("%s holds no grant %q; tp grant --list lists them", dev.User, req.Grant))
		return
	}
	if !g.Revoked {
		if err := e.Users.RevokeDevice(g.ID); errors.Is(err, users.ErrUnavailable) {
			e.unavailable(w, "grant revocation", err, "so the grant stays; try again in a minute")
			return
		} else if err != nil {
			e.log().Error("revoking a grant failed", "grant", g.ID, "by", dev.ID, "err", err)
			writeErr(w, http.StatusInternalServerError, "revoking the grant failed on the server; try again or ask your administrator to check tpd's log")
			return
		}
		e.log().Info("grant revoked by its person", "grant", g.ID, "by", dev.ID, "remote", r.RemoteAddr)
		if e.GrantRevoked != nil {
			e.GrantRevoked(g, dev.ID, r.RemoteAddr)
		}
		g.Revoked = true
	}
	writeJSON(w, http.StatusOK, e.grantInfo(g))
}

// grantScope is the scope a grant of name gives; origin binds a grant to
// connect to the pages of one web origin.
func grantScope(name string, public, dial bool, origin string) (authz.Scope, error) {
	kind := "expose"
	switch {
	case dial && public:
		return "", errors.New("a grant is to connect or to expose a name, not both")
	case origin != "" && !dial:
		return "", errors.New("only a grant to connect is bound to a web origin")
	case origin != "" && !authz.ValidOrigin(origin):
		return "", fmt.Errorf("origin %q is not a web origin (https://HOST[:PORT], lower case)", origin)
	case dial:
		kind = "dial"
	case public:
		kind = "expose-public"
	}
	if origin != "" {
		name += "@" + origin
	}
	sc, err := authz.ParseScope(kind + ":" + name)
	if err != nil && dial {
		return "", fmt.Errorf("name %q is not a reverse name's label (1 to 63 lower-case letters, digits or '-', e.g. ci for ci.rev.tp.internal), nor * (what the policy allows)", name)
	} else if err != nil {
		return "", fmt.Errorf("name %q is not a reverse name's label (1 to 63 lower-case letters, digits or '-', e.g. ci for ci.rev.tp.internal)", name)
	}
	return sc, nil
}

// checkApp checks what an application calls itself (login.ValidApp), since a
// person reads it.
func checkApp(app string) error { return login.ValidApp(app) }

// describeApp is app as the audit trail names it.
func describeApp(app string) string {
	if app == "" {
		return "an application that gave no name"
	}
	return fmt.Sprintf("%q", app)
}

// MayExposeFunc is what Enroller.MayExpose asks: whether the policy lets id
// keep the reverse name label exposed (and publicly), and why not.
type MayExposeFunc func(ctx context.Context, id authz.Identity, label string, public bool) (bool, string)
