package acme

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

// Guest shares (login/share.go): a person who may keep a reverse name
// exposed gives it, for a limited time, to an outside person the identity
// provider vouches for (an email address, or anyone at one domain). The
// guest signs in with dlogin --sso (enrollGuest) and gets a device of their
// own, named after their address, that may connect to that one name and
// nothing else (authz.Scope guest:NAME); its certificates end with the share
// (the CA's enforcer), and revoking the share, or its approver, ends the
// guest's sessions at once.

// share records a share a person made from an enrolled device, once the
// policy lets them keep the name exposed themselves.
func (e *Enroller) share(w http.ResponseWriter, r *http.Request) {
	var req login.ShareRequest
	if !decode(w, r, &req) {
		return
	}
	dev, ok := e.person(w, r, req.DeviceID, req.Time, req.Signature,
		login.ShareMessage(req.DeviceID, req.Time, req.ID, req.Name, req.Guest, req.Until))
	if !ok {
		return
	}
	groups, _ := e.Users.Lookup(dev.ID)
	id := authz.Identity{DeviceID: dev.ID, User: dev.User, Device: dev.Name, Groups: groups}
	sh, status, msg := e.makeShare(r, id, dev.ID, req, nil)
	if status != 0 {
		if status == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", "30")
		}
		writeErr(w, status, msg)
		return
	}
	writeJSON(w, http.StatusOK, e.shareInfo(sh))
}

// makeShare checks and records a share approved by id (recorded as by): the
// share, or the HTTP status and the sentence of a refusal. prepare, when
// set, runs once the policy let the share through and before it is
// recorded; a status refuses it with its sentence.
func (e *Enroller) makeShare(r *http.Request, id authz.Identity, by string, req login.ShareRequest, prepare func() (int, string)) (users.Share, int, string) {
	if e.SSO == nil {
		return users.Share{}, http.StatusNotFound, "this TP server does not sign people in with an identity provider, so a guest could not sign in; ask your TP administrator to set sso-issuer"
	}
	if !users.ValidShareID(req.ID) {
		return users.Share{}, http.StatusBadRequest, fmt.Sprintf("share id %q: want share- and 12 lower-case hex digits", req.ID)
	}
	if _, err := authz.GuestScope(req.Name); err != nil {
		return users.Share{}, http.StatusBadRequest, fmt.Sprintf("name %q is not a reverse name's label (1 to 63 lower-case letters, digits or '-', e.g. laptop-ssh for laptop-ssh.rev.tp.internal)", req.Name)
	}
	guest, err := users.ParseGuest(req.Guest)
	if err != nil {
		return users.Share{}, http.StatusBadRequest, err.Error()
	}
	if e.SSO.Domain != "" && (guest == "@"+asciiLower(e.SSO.Domain) || users.Share{Guest: "@" + asciiLower(e.SSO.Domain)}.For(guest)) {
		return users.Share{}, http.StatusBadRequest, fmt.Sprintf("%s is of this server's own domain %s: its people sign in with dlogin --sso and the policy decides what they reach; share with people outside it", guest, e.SSO.Domain)
	}
	if why := e.SSO.guestRefused(guest); why != "" {
		return users.Share{}, http.StatusForbidden, why
	}
	until, err := time.Parse(time.RFC3339, req.Until)
	now := e.now()
	switch {
	case err != nil:
		return users.Share{}, http.StatusBadRequest, "until must be RFC 3339"
	case !until.After(now.Add(time.Minute)):
		return users.Share{}, http.StatusBadRequest, fmt.Sprintf("the share would end at %s, in the past or within a minute; give a later end", until.UTC().Format(time.RFC3339))
	case until.Sub(now) > login.MaxShareFor+5*time.Minute: // a client's clock a little ahead
		return users.Share{}, http.StatusBadRequest, fmt.Sprintf("a share lasts at most %s; give an end before %s", login.MaxShareFor, now.Add(login.MaxShareFor).UTC().Format(time.RFC3339))
	}
	if e.MayShare == nil {
		return users.Share{}, http.StatusForbidden, "this TP server does not let people share names with guests"
	}
	if ok, reason := e.MayShare(r.Context(), id, req.Name, false); !ok {
		e.log().Info("share refused", "approver", by, "name", req.Name, "guest", guest, "why", reason)
		return users.Share{}, http.StatusForbidden, reason
	}
	// A name another user's agent holds is theirs to share: its agent admits
	// only guests of its own user's shares, so such a share would let nobody
	// in, and it would read as if it did.
	if e.ReverseOwner != nil {
		if owner, held := e.ReverseOwner(e.reverseHost(req.Name)); held {
			if u, _, _ := strings.Cut(owner, "@"); u != id.User {
				return users.Share{}, http.StatusForbidden, fmt.Sprintf("%s is exposed by another user's device (%s); only its own people can share it", e.reverseHost(req.Name), owner)
			}
		}
	}
	if prepare != nil {
		if status, msg := prepare(); status != 0 {
			return users.Share{}, status, msg
		}
	}
	sh := users.Share{ID: req.ID, Name: req.Name, Guest: guest, User: id.User, By: by, Created: now, Until: until.UTC()}
	switch err := e.Users.AddShare(sh, e.MaxShares); {
	case errors.Is(err, users.ErrStoreFull):
		e.log().Warn("share refused: the store holds as many shares as it keeps", "approver", by)
		return sh, http.StatusServiceUnavailable, "the server holds as many shares as it keeps; try again tomorrow, or ask your TP administrator"
	case errors.Is(err, users.ErrTooManyShares):
		return sh, http.StatusForbidden, fmt.Sprintf("%s already has as many shares running as this server allows; end one (tp share --list lists them, tp share --revoke ID ends one; or the page %s)", id.User, login.PathGrantsPage)
	case errors.Is(err, users.ErrSharesKept):
		return sh, http.StatusForbidden, fmt.Sprintf("%s has made %d shares in the last %d days, the most this server keeps, ended ones included; the oldest are forgotten %d days after their end", id.User, users.MaxSharesKept, int(users.ShareKeep.Hours()/24), int(users.ShareKeep.Hours()/24))
	case errors.Is(err, users.ErrUnavailable):
		e.log().Error("share failed: the user store is unavailable", "approver", by, "err", err)
		return sh, http.StatusServiceUnavailable, "the server cannot reach its database right now, so nothing was shared; try again in a minute"
	case err != nil:
		// The same request again (its ID exists): answer with the share.
		for _, o := range e.Users.Shares() {
			if o.ID == sh.ID && o.By == sh.By && o.Name == sh.Name && o.Guest == sh.Guest {
				return o, 0, ""
			}
		}
		if errors.Is(err, users.ErrShareIDUsed) {
			return sh, http.StatusConflict, fmt.Sprintf("share ID %s was used before; ask again with a new ID", sh.ID)
		}
		e.log().Error("share failed", "approver", by, "err", err)
		return sh, http.StatusInternalServerError, "sharing failed on the server; try again or ask your administrator to check tpd's log"
	}
	e.log().Info("name shared with a guest", "share", sh.ID, "name", sh.Name, "guest", sh.Guest, "until", sh.Until, "approver", by, "remote", r.RemoteAddr)
	if e.Shared != nil {
		e.Shared(sh, r.RemoteAddr)
	}
	return sh, 0, ""
}

// shareInfo is what a person is told of a share.
func (e *Enroller) shareInfo(sh users.Share) login.ShareInfo {
	return e.shareInfos([]users.Share{sh})[0]
}

// shareInfos is what a person is told of shares, with one look at the store.
func (e *Enroller) shareInfos(shares []users.Share) []login.ShareInfo {
	a, guests := e.approvers()
	out := make([]login.ShareInfo, 0, len(shares))
	now := e.now()
	for _, sh := range shares {
		info := login.ShareInfo{ID: sh.ID, Name: sh.Name, Host: e.reverseHost(sh.Name), Guest: sh.Guest, By: sh.By,
			Created: sh.Created, Until: sh.Until, State: a.ShareState(sh, now, e.deniedID), Guests: guests[sh.ID]}
		if info.Guests == nil {
			info.Guests = []string{}
		}
		out = append(out, info)
	}
	return out
}

// approvers is the store's devices, users and shares (users.Approvers), and
// the devices each share enrolled.
func (e *Enroller) approvers() (users.Approvers, map[string][]string) {
	return users.ListApprovers(e.Users.Users(), e.Users.Shares())
}

// myShares is the shares of user, oldest first.
func (e *Enroller) myShares(user string) []login.ShareInfo {
	var mine []users.Share
	for _, sh := range e.Users.Shares() {
		if sh.User == user {
			mine = append(mine, sh)
		}
	}
	return e.shareInfos(mine)
}

// shares lists the shares of the asking device's user.
func (e *Enroller) shares(w http.ResponseWriter, r *http.Request) {
	var req login.SharesRequest
	if !decode(w, r, &req) {
		return
	}
	dev, ok := e.person(w, r, req.DeviceID, req.Time, req.Signature, login.SharesMessage(req.DeviceID, req.Time))
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, login.SharesResponse{Shares: e.myShares(dev.User)})
}

// shareRevoke ends one of the asking device's user's shares for good.
func (e *Enroller) shareRevoke(w http.ResponseWriter, r *http.Request) {
	var req login.ShareRevokeRequest
	if !decode(w, r, &req) {
		return
	}
	dev, ok := e.person(w, r, req.DeviceID, req.Time, req.Signature, login.ShareRevokeMessage(req.DeviceID, req.Time, req.Share))
	if !ok {
		return
	}
	sh, status, msg := e.endShare(r, dev.User, dev.ID, req.Share)
	if status != 0 {
		writeErr(w, status, msg)
		return
	}
	writeJSON(w, http.StatusOK, e.shareInfo(sh))
}

// endShare revokes id, one of user's shares, for good, on behalf of by.
func (e *Enroller) endShare(r *http.Request, user, by, id string) (users.Share, int, string) {
	var sh *users.Share
	for _, o := range e.Users.Shares() {
		if o.ID == id && o.User == user {
			sh = &o
			break
		}
	}
	if sh == nil {
		return users.Share{}, http.StatusNotFound, fmt.Sprintf("%s has no share %q; tp share --list lists them", user, id)
	}
	if sh.Revoked {
		return *sh, 0, ""
	}
	out, err := e.Users.RevokeShare(id)
	switch {
	case errors.Is(err, users.ErrUnavailable):
		return *sh, http.StatusServiceUnavailable, "the server cannot reach its database right now, so the share stays; try again in a minute"
	case err != nil:
		e.log().Error("revoking a share failed", "share", id, "by", by, "err", err)
		return *sh, http.StatusInternalServerError, "revoking the share failed on the server; try again or ask your administrator to check tpd's log"
	}
	e.log().Info("share revoked by its person", "share", id, "name", out.Name, "guest", out.Guest, "by", by, "remote", r.RemoteAddr)
	if e.ShareRevoked != nil {
		e.ShareRevoked(out, by, r.RemoteAddr)
	}
	return out, 0, ""
}

// guestShare is the share a guest's sign-in takes: of those for the
// person's verified address that have not ended, the one for name (any when
// name is empty and there is one), or the sentence of a refusal.
func (e *Enroller) guestShare(a users.Approvers, email, name string) (users.Share, string) {
	var found []users.Share
	now := e.now()
	for _, sh := range a.Shares {
		if sh.For(email) && (name == "" || sh.Name == name) && e.SSO.guestRefused(sh.Guest) == "" && a.ShareState(*sh, now, e.deniedID) == "active" {
			found = append(found, *sh)
		}
	}
	users.SortShares(found)
	switch {
	case len(found) == 0 && name != "":
		return users.Share{}, fmt.Sprintf("nobody has shared %s with %s, or the share has ended; ask the person who exposes it to run tp share %s --with %s", name, email, name, email)
	case len(found) == 0:
		return users.Share{}, fmt.Sprintf("people of %q may not enrol devices on this TP server (its sso-domain is %s), and nobody has shared a name with %s", domainOf(email), e.SSO.Domain, email)
	}
	names := []string{}
	for _, sh := range found {
		if !slices.Contains(names, sh.Name) {
			names = append(names, sh.Name)
		}
	}
	if len(names) > 1 {
		return users.Share{}, fmt.Sprintf("several names are shared with %s (%s): sign in for one, dlogin --sso --share NAME", email, strings.Join(names, ", "))
	}
	// The newest share of a name wins when the same name was shared twice.
	return found[len(found)-1], ""
}

// reverseHost is label's full reverse name.
func (e *Enroller) reverseHost(label string) string {
	if e.ReverseZone == "" {
		return label
	}
	return label + "." + e.ReverseZone
}

func domainOf(email string) string {
	for i := len(email) - 1; i >= 0; i-- {
		if email[i] == '@' {
			return email[i+1:]
		}
	}
	return email
}

// enrollGuest registers the device key of a guest, a person outside the
// server's domain whom the provider vouched for (p), for the share of their
// address that they picked (req.Share) or the only one.
func (e *Enroller) enrollGuest(w http.ResponseWriter, r *http.Request, req login.EnrollSSORequest, p ssoPerson) {
	refuse := func(msg string) {
		e.log().Warn("guest enrollment refused", "email", p.Email, "remote", r.RemoteAddr, "why", msg)
		writeErr(w, http.StatusForbidden, msg)
	}
	if req.Share != "" {
		if _, err := authz.GuestScope(req.Share); err != nil {
			writeErr(w, http.StatusBadRequest, fmt.Sprintf("share %q is not a reverse name's label", req.Share))
			return
		}
	}
	// One look at the store for the checks below.
	a, guests := e.approvers()
	sh, why := e.guestShare(a, p.Email, req.Share)
	if why != "" {
		refuse(why)
		return
	}
	if p.User == "" {
		refuse(fmt.Sprintf("the address %s gives no TP user name (at most 63 letters, digits, '.', '_' or '-'); ask %s to share %s with a shorter address", p.Email, sh.User, sh.Name))
		return
	}
	// A guest is named by their whole address. A user of that name who is
	// not this person at the provider (an enrolled user, or another
	// account) keeps it.
	if u := a.Users[p.User]; u != nil && u.SSOSubject != p.Subject {
		refuse(fmt.Sprintf("this server already has a user named %s who is not the account you signed in with; ask your TP administrator", p.User))
		return
	}
	id := authz.DeviceID(p.User, req.Device)
	if e.Denied != nil {
		scope, _ := authz.GuestScope(sh.Name)
		if reason, denied := e.Denied(users.Device{ID: id, User: p.User, Name: req.Device, Scope: scope, GrantedBy: users.ShareApprover + sh.ID}); denied {
			writeErr(w, http.StatusForbidden, reason)
			return
		}
	}
	// What the store would refuse anyway is refused before the user is
	// bound, so that a refused guest leaves no user behind.
	if dev, err := e.Users.Device(id); err == nil && dev.Revoked { // the listing has no keys
		writeErr(w, http.StatusForbidden, fmt.Sprintf("device %q has been revoked; give this device another name (dlogin --sso --device NAME)", id))
		return
	} else if err == nil && len(dev.PublicKey) > 0 {
		writeErr(w, http.StatusConflict, fmt.Sprintf("device %q is already enrolled; give this device another name (dlogin --sso --device NAME)", id))
		return
	}
	live := 0
	for _, g := range guests[sh.ID] {
		if d := a.Devices[g]; d != nil && !d.Revoked {
			live++
		}
	}
	if live >= users.MaxGuestsPerShare {
		refuse(fmt.Sprintf("the share of %s already has %d guests' devices, the most allowed; ask %s for a share of your own", sh.Name, users.MaxGuestsPerShare, sh.User))
		return
	}
	if err := e.Users.BindUser(p.User, p.Subject); err != nil {
		switch {
		case errors.Is(err, users.ErrOtherAccount):
			refuse(fmt.Sprintf("this server already has a user named %s who is not the account you signed in with; ask your TP administrator", p.User))
		case errors.Is(err, users.ErrUnavailable):
			e.unavailable(w, "guest enrollment", err, "so nothing was enrolled; run dlogin --sso again in a minute")
		default:
			e.log().Error("guest enrollment failed", "err", err)
			writeErr(w, http.StatusInternalServerError, "enrollment failed on the server; try again or ask your administrator to check tpd's log")
		}
		return
	}
	der, _ := base64.StdEncoding.DecodeString(req.PublicKey)
	dev, err := e.Users.EnrollSignIn(users.SignIn{User: p.User, Device: req.Device, PublicKey: der,
		Subject: p.Subject, Groups: []string{}, Max: e.SSO.maxDevices(), Revoked: e.deniedID, Share: sh.ID})
	switch {
	case errors.Is(err, users.ErrShareEnded):
		refuse(fmt.Sprintf("the share of %s with you has ended; ask %s to share it again", sh.Name, sh.User))
		return
	case errors.Is(err, users.ErrShareFull):
		refuse(fmt.Sprintf("the share of %s already has %d guests' devices, the most allowed; ask %s for a share of your own", sh.Name, users.MaxGuestsPerShare, sh.User))
		return
	case errors.Is(err, users.ErrDeviceExists):
		writeErr(w, http.StatusConflict, fmt.Sprintf("device %q is already enrolled; give this device another name (dlogin --sso --device NAME)", id))
		return
	case errors.Is(err, users.ErrDeviceRevoked), errors.Is(err, users.ErrTooManyDevices):
		e.refuseSignInDevice(w, p, req.Device, err)
		return
	case errors.Is(err, users.ErrUnavailable):
		e.unavailable(w, "guest enrollment", err, "so nothing was enrolled; run dlogin --sso again in a minute")
		return
	case err != nil:
		e.log().Error("guest enrollment failed", "err", err)
		writeErr(w, http.StatusInternalServerError, "enrollment failed on the server; try again or ask your administrator to check tpd's log")
		return
	}
	if _, err := e.Users.Lookup(dev.ID); err != nil {
		_ = e.Users.RevokeDevice(dev.ID)
		refuse(err.Error())
		return
	}
	e.log().Info("guest device enrolled by single sign-on", "device", dev.ID, "email", p.Email, "share", sh.ID, "name", sh.Name, "until", sh.Until, "remote", r.RemoteAddr)
	if e.Enrolled != nil {
		e.Enrolled(dev, r.RemoteAddr, fmt.Sprintf("guest sign-in as %s, by %s's share %s of %s", p.Email, sh.User, sh.ID, sh.Name))
	}
	writeJSON(w, http.StatusOK, login.EnrollSSOResponse{
		EnrollResponse: login.EnrollResponse{DeviceID: dev.ID, User: dev.User, Device: dev.Name},
		Groups:         []string{},
		Guest:          &login.GuestInfo{Name: sh.Name, Host: e.reverseHost(sh.Name), Share: sh.ID, By: sh.User, Until: sh.Until}})
}

// guestRefused says why the server's sso-guest-domains refuse guest (an
// address, or @DOMAIN for a whole domain), "" when they let it in.
func (s *SSO) guestRefused(guest string) string {
	if len(s.GuestDomains) == 0 {
		return "this TP server lets no guests in; its administrator names the email domains guests may come from in sso-guest-domains"
	}
	domain := domainOf(guest)
	whole := strings.HasPrefix(guest, "@")
	for _, d := range s.GuestDomains {
		if d == domain || d == "*" && !whole {
			return ""
		}
	}
	if whole {
		return fmt.Sprintf("a share with everyone at %s needs %s named in the server's sso-guest-domains; share with one address instead, or ask your TP administrator", domain, domain)
	}
	return fmt.Sprintf("guests of %s may not be let in: the server's sso-guest-domains do not name it; ask your TP administrator", domain)
}
