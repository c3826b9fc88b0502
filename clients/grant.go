package clients

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/tp-proxy/tp/acme/login"
)

// Grants (docs/EXPOSE.md, "A credential an application asks for"): an
// application that should not hold a person's identity makes a key of its
// own, shows a link, and waits until a person approves it from an enrolled
// device; the server then holds a device of the person's user, scoped to
// keeping one reverse name exposed, whose key is the application's.

// GrantRequest is an application's request for a grant.
type GrantRequest struct {
	Server      string // the server's base URL
	Fingerprint string // its root CA's SHA-256 fingerprint, as tpd prints it
	Name        string // the reverse name's label to keep exposed
	Public      bool
	App         string // what the application calls itself
	// Show is told the link and the code once, to show the person.
	Show func(link, code string)
	// Poll is how often the server is asked (zero: 2 s).
	Poll time.Duration
	// Pick lets the person approve another name than Name (its suggestion):
	// the application then exposes the name granted (GrantedName).
	Pick bool
	// Approver, when set, is the only user whose approval the application
	// takes: one of anybody else's (someone who saw the link first) is
	// refused, and the application must make a new key.
	Approver string
}

// RequestGrant makes home the application's own (its key, the server's root),
// shows the grant's link, and waits until a person approved it or ctx ends;
// then it logs in with the application's key, so that home holds a
// certificate for the granted device. A home already granted (it has a
// profile) is returned at once.
func RequestGrant(ctx context.Context, home Home, req GrantRequest) (*Client, error) {
	if _, err := home.Profile(); err == nil {
		return Open(home)
	} else if !errors.Is(err, ErrNoProfile) {
		return nil, err
	}
	if req.Server == "" || req.Fingerprint == "" {
		return nil, errors.New("asking for a grant needs --server and --fingerprint (the server's base URL and CA fingerprint, as tpd prints them)")
	}
	server, err := ServerBaseURL(req.Server)
	if err != nil {
		return nil, err
	}
	if err := home.Init(); err != nil {
		return nil, err
	}
	root, err := login.FetchRoot(ctx, server, req.Fingerprint)
	if err != nil {
		return nil, err
	}
	if err := home.SaveRoot(root); err != nil {
		return nil, err
	}
	key, err := home.DeviceKey()
	if errors.Is(err, ErrNoDeviceKey) {
		if key, err = NewDeviceKey(); err == nil {
			err = home.SaveDeviceKey(key)
		}
	}
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, err
	}
	g := login.Grant{Server: server, Name: req.Name, Public: req.Public, App: req.App, Key: der, Pick: req.Pick}
	if req.Show != nil {
		req.Show(g.Link(), login.GrantCode(der))
	}
	poll := req.Poll
	if poll <= 0 {
		poll = 2 * time.Second
	}
	hc := login.HTTPClient(root)
	defer hc.CloseIdleConnections()
	for {
		res, err := login.GrantStatus(ctx, hc, server, key)
		switch {
		case err == nil && req.Approver != "" && !strings.HasPrefix(res.DeviceID, req.Approver+"@"):
			return nil, fmt.Errorf("the key of %s was approved by another user than %s (it is %s's credential %s); remove %s and ask again", home.Dir, req.Approver, strings.SplitN(res.DeviceID, "@", 2)[0], res.DeviceID, home.Dir)
		case err == nil && !scopeAsked(req, res.Scope):
			return nil, fmt.Errorf("the key of %s was approved as %s with scope %q, not the %q this application asked for; remove %s and ask again", home.Dir, res.DeviceID, res.Scope, wantScope(req), home.Dir)
		case err == nil:
			if err := home.SaveProfile(Profile{Server: server, Fingerprint: login.Fingerprint(root), DeviceID: res.DeviceID, Scope: res.Scope}); err != nil {
				return nil, err
			}
			c, err := Open(home)
			if err != nil {
				return nil, err
			}
			if _, err := c.Login(ctx, nil); err != nil {
				return nil, fmt.Errorf("approved as %s, but logging in failed: %w", res.DeviceID, err)
			}
			return c, nil
		case !errors.Is(err, login.ErrGrantPending):
			return nil, fmt.Errorf("asking %s whether the grant was approved: %w", server, err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no one approved the grant: %w", context.Cause(ctx))
		case <-time.After(poll):
		}
	}
}

// scopeAsked says whether scope, the one granted, is what req asked for:
// its scope, or with Pick, one of its kind for any name.
func scopeAsked(req GrantRequest, scope string) bool {
	if !req.Pick {
		return scope == wantScope(req)
	}
	kind, label, _ := strings.Cut(scope, ":")
	want, _, _ := strings.Cut(wantScope(req), ":")
	return kind == want && label != ""
}

// GrantedName is the reverse name the grant home holds may keep exposed, and
// the granted device (whose user approved it): from the profile, saved when
// the grant was approved, or else asked of the server with the
// application's key (a person may have picked another name than the one
// asked for).
func GrantedName(ctx context.Context, home Home) (name, device string, err error) {
	p, err := home.Profile()
	if err != nil {
		return "", "", err
	}
	scope := p.Scope
	if scope == "" {
		root, err := home.Root()
		if err != nil {
			return "", "", err
		}
		key, err := home.DeviceKey()
		if err != nil {
			return "", "", err
		}
		hc := login.HTTPClient(root)
		defer hc.CloseIdleConnections()
		res, err := login.GrantStatus(ctx, hc, p.Server, key)
		if err != nil {
			return "", "", fmt.Errorf("asking %s which name this application's grant is for: %w", p.Server, err)
		}
		scope = res.Scope
		p.Scope = scope
		_ = home.SaveProfile(p) // asked once; the next start reads it here
	}
	kind, label, _ := strings.Cut(scope, ":")
	if (kind != "expose" && kind != "expose-public") || label == "" {
		return "", "", fmt.Errorf("%s holds %s, whose scope %q is not a grant's", home.Dir, p.DeviceID, scope)
	}
	return label, p.DeviceID, nil
}

// wantScope is the scope req asks for.
func wantScope(req GrantRequest) string {
	if req.Public {
		return "expose-public:" + req.Name
	}
	return "expose:" + req.Name
}

// ApproveGrant approves the grant whose link is link, from this device: the
// server creates a device of this device's user that holds the application's
// key and may only keep the grant's name exposed (name instead, when not
// empty, if the link lets the person pick). The link must name this
// device's server.
func (c *Client) ApproveGrant(ctx context.Context, link, name string) (login.Grant, login.GrantResponse, error) {
	g, err := login.ParseGrantLink(link)
	if err != nil {
		return g, login.GrantResponse{}, err
	}
	if name != "" && name != g.Name {
		if !g.Pick {
			return g, login.GrantResponse{}, fmt.Errorf("the application asks for %s and takes no other name (its link does not let you pick: it was not made with tp expose --request --let-pick)", g.Name)
		}
		g.Name = name
	}
	if g.Server != c.Profile.Server {
		return g, login.GrantResponse{}, fmt.Errorf("the grant link is for the TP server %s, and this device is enrolled at %s: approve it from a device of that server", g.Server, c.Profile.Server)
	}
	key, err := c.Home.DeviceKey()
	if err != nil {
		return g, login.GrantResponse{}, err
	}
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections()
	res, err := login.Approve(ctx, hc, c.Profile.Server, c.Profile.DeviceID, key, g)
	return g, res, err
}

// ListGrants lists the grants of this device's user, oldest first.
func (c *Client) ListGrants(ctx context.Context) ([]login.GrantInfo, error) {
	key, err := c.Home.DeviceKey()
	if err != nil {
		return nil, err
	}
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections()
	return login.ListGrants(ctx, hc, c.Profile.Server, c.Profile.DeviceID, key)
}

// RevokeGrant revokes one of this device's user's grants for good.
func (c *Client) RevokeGrant(ctx context.Context, grant string) (login.GrantInfo, error) {
	key, err := c.Home.DeviceKey()
	if err != nil {
		return login.GrantInfo{}, err
	}
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections()
	return login.RevokeGrant(ctx, hc, c.Profile.Server, c.Profile.DeviceID, key, grant)
}
