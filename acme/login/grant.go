package login

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base32"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"
	"unicode"
)

// Grants: an application that should not hold a person's identity (a CI
// job's agent, a service that publishes itself) asks a person for a
// credential that can do one thing, keep one reverse name exposed
// (docs/LOGIN.md, "Grants"). The application makes its own key and shows a
// link (GrantLink) with the key, the name and what it calls itself; the
// person approves it from an enrolled device (PathGrant, signed by that
// device's key); the server creates a device of the person's user holding the
// application's key, with the scope expose:NAME (or expose-public:NAME); the
// application asks PathGrantStatus, signed by its key, until the device
// exists, and logs in with its key as any device does.
const (
	PathGrant       = "/tp/v1/grant"
	PathGrantStatus = "/tp/v1/grant/status"
	// PathGrantCertificate issues, to the holder of a key granted a scope
	// dial:NAME (a browser: TP.js), a device certificate for that key.
	PathGrantCertificate = "/tp/v1/grant/certificate"
	// PathGrants lists the grants of the asking device's user, and
	// PathGrantRevoke revokes one; both signed by an enrolled device's key.
	PathGrants      = "/tp/v1/grants"
	PathGrantRevoke = "/tp/v1/grant/revoke"
	// PathGrantPage is the website page a grant link opens: what is asked,
	// and the command that approves it.
	PathGrantPage = "/grant"
	// PathGrantSignIn starts an approval on the website by signing in with
	// the organisation's identity provider (the grant link's query follows);
	// the provider sends the browser back to PathGrantSignedIn, whose page
	// asks to approve, answered by a POST to PathGrantApprove.
	PathGrantSignIn   = "/grant/sign-in"
	PathGrantSignedIn = "/grant/signed-in"
	PathGrantApprove  = "/grant/approve"
	// PathGrantsPage lists, after a sign-in, the grants of the person's
	// user, each with a button that revokes it (a POST to
	// PathGrantRevokePage).
	PathGrantsPage      = "/grant/mine"
	PathGrantRevokePage = "/grant/revoke"
	// CodeGrantPending is PathGrantStatus's answer (404) while no device holds
	// the key.
	CodeGrantPending = "grant_pending"
	// MaxGrantApp bounds what an application calls itself, in bytes.
	MaxGrantApp = 64
)

const (
	grantContext       = "tp-grant-v1"
	grantStatusContext = "tp-grant-status-v1"
	grantCertContext   = "tp-grant-certificate-v1"
	grantsContext      = "tp-grants-v1"
	grantRevokeContext = "tp-grant-revoke-v1"
)

// GrantRequest is a person's approval, from an enrolled device, of an
// application's request.
type GrantRequest struct {
	DeviceID  string `json:"device_id"` // the approving device
	Time      string `json:"time"`      // RFC 3339, within 5 minutes of the server's clock
	Signature string `json:"signature"` // the approving device key's, over GrantMessage
	AppKey    string `json:"app_key"`   // base64 PKIX DER of the application's key (ECDSA P-256)
	Name      string `json:"name"`      // the reverse name's label the application may keep exposed
	Public    bool   `json:"public"`    // also publicly (scope expose-public)
	App       string `json:"app"`       // what the application calls itself, shown to the person
	// Dial asks for a credential that may only connect: to the reverse name
	// Name, or with Name "*" to what the policy lets the person connect to
	// (scope dial:NAME); a browser's (TP.js). Origin, with Dial, binds it to
	// the pages of one web origin (scope dial:NAME@ORIGIN).
	Dial   bool   `json:"dial,omitempty"`
	Origin string `json:"origin,omitempty"`
}

// GrantMessage is what the approving device key signs; a grant to connect
// (dial) adds fields, so that the signature of one to expose stays as it was.
func GrantMessage(deviceID, ts, appKey, name string, public bool, app string, dial bool, origin string) []byte {
	m := fmt.Sprintf("%s\x00%s\x00%s\x00%s\x00%s\x00%t\x00%s", grantContext, deviceID, ts, appKey, name, public, app)
	if dial {
		m += "\x00dial\x00" + origin
	}
	return []byte(m)
}

// GrantResponse names the device the approval created and its scope.
type GrantResponse struct {
	DeviceID string `json:"device_id"`
	Scope    string `json:"scope"`
}

// GrantStatusRequest asks, signed by the application's key, whether a person
// approved it.
type GrantStatusRequest struct {
	PublicKey string `json:"public_key"` // base64 PKIX DER of the application's key
	Time      string `json:"time"`
	Signature string `json:"signature"` // the application key's, over GrantStatusMessage
}

// GrantStatusMessage is what the application's key signs to ask.
func GrantStatusMessage(publicKey, ts string) []byte {
	return []byte(grantStatusContext + "\x00" + publicKey + "\x00" + ts)
}

// GrantCertificateMessage is what the granted key signs to get its
// certificate (a GrantStatusRequest to PathGrantCertificate).
func GrantCertificateMessage(publicKey, ts string) []byte {
	return []byte(grantCertContext + "\x00" + publicKey + "\x00" + ts)
}

// GrantCertificateResponse is a device certificate for a granted key: the
// chain, leaf first, each base64 DER.
type GrantCertificateResponse struct {
	DeviceID string   `json:"device_id"`
	Scope    string   `json:"scope"`
	NotAfter string   `json:"not_after"` // RFC 3339
	Chain    []string `json:"chain"`
}

// GrantCode is the code both sides show for a key (PKIX DER), so that the
// person approves the application that waits: 80 bits of its SHA-256 in
// base32, XXXX-XXXX-XXXX-XXXX (too many to search for a key that matches).
func GrantCode(pkix []byte) string {
	sum := sha256.Sum256(pkix)
	c := base32.StdEncoding.EncodeToString(sum[:10])
	return c[:4] + "-" + c[4:8] + "-" + c[8:12] + "-" + c[12:16]
}

// ValidApp checks what an application calls itself, which a person reads
// before approving: at most MaxGrantApp bytes of letters, digits, spaces and
// . , : / @ + # _ - (no brackets or quotes that could dress it up as the code
// or as a command, no control characters).
func ValidApp(app string) error {
	if len(app) > MaxGrantApp {
		return fmt.Errorf("app is %d bytes; at most %d", len(app), MaxGrantApp)
	}
	for _, c := range app {
		if !unicode.IsLetter(c) && !unicode.IsDigit(c) && !strings.ContainsRune(" .,:/@+#_-", c) {
			return fmt.Errorf("app holds %q; an application's name may hold letters, digits, spaces and . , : / @ + # _ -", c)
		}
	}
	return nil
}

// Grant is what an application asks for, in its link.
type Grant struct {
	Server string // the server's base URL, https://HOST[:PORT]
	Name   string
	Public bool
	App    string
	Key    []byte // PKIX DER of the application's key
	// Pick says the application takes whichever name the person approves
	// (Name is its suggestion): it exposes the name of the scope granted.
	Pick bool
	// Dial asks for a credential that may only connect (to Name, or with
	// Name "*" to what the policy allows): scope dial:NAME, TP.js's; Origin
	// binds it to the pages of one web origin (dial:NAME@ORIGIN).
	Dial   bool
	Origin string
}

// Scope is the scope the grant asks for.
func (g Grant) Scope() string {
	switch {
	case g.Dial && g.Origin != "":
		return "dial:" + g.Name + "@" + g.Origin
	case g.Dial:
		return "dial:" + g.Name
	case g.Public:
		return "expose-public:" + g.Name
	}
	return "expose:" + g.Name
}

// Link is the grant's link: the server's grant page with the request in its
// query.
func (g Grant) Link() string {
	q := url.Values{}
	q.Set("name", g.Name)
	if g.Public {
		q.Set("public", "1")
	}
	if g.App != "" {
		q.Set("app", g.App)
	}
	if g.Pick {
		q.Set("pick", "1")
	}
	if g.Dial {
		q.Set("dial", "1")
	}
	if g.Origin != "" {
		q.Set("origin", g.Origin)
	}
	q.Set("key", base64.RawURLEncoding.EncodeToString(g.Key))
	return g.Server + PathGrantPage + "?" + q.Encode()
}

// Command is the command that approves g on an enrolled device, safe to
// paste into a POSIX shell, PowerShell or cmd.exe: Link percent-encodes every
// character they would act on, and the double quotes hold the & between the
// fields on all three.
func (g Grant) Command() string { return `tp grant "` + g.Link() + `"` }

// ParseGrantLink reads a grant link.
func ParseGrantLink(link string) (Grant, error) {
	u, err := url.Parse(strings.TrimSpace(link))
	if err != nil || u.Scheme != "https" || u.Host == "" || u.Path != PathGrantPage {
		return Grant{}, fmt.Errorf("%q is not a grant link (https://SERVER%s?name=…&key=…, as tp expose --request printed it)", link, PathGrantPage)
	}
	q := u.Query()
	key, err := base64.RawURLEncoding.DecodeString(q.Get("key"))
	if err != nil || len(key) == 0 {
		return Grant{}, fmt.Errorf("the grant link carries no readable key: copy the whole link tp expose --request printed")
	}
	if _, err := x509.ParsePKIXPublicKey(key); err != nil {
		return Grant{}, fmt.Errorf("the grant link's key cannot be read (%v): copy the whole link tp expose --request printed", err)
	}
	g := Grant{Server: "https://" + u.Host, Name: q.Get("name"), Public: q.Get("public") == "1", App: q.Get("app"), Key: key,
		Pick: q.Get("pick") == "1", Dial: q.Get("dial") == "1", Origin: q.Get("origin")}
	if g.Dial && (g.Public || g.Pick) {
		return Grant{}, errors.New("the grant link asks for a credential that connects and also for one that exposes: it was not made by TP")
	}
	if g.Origin != "" && !g.Dial {
		return Grant{}, errors.New("the grant link names a web origin for a credential that does not connect: it was not made by TP")
	}
	if g.Name == "" {
		return Grant{}, errors.New("the grant link names no reverse name: copy the whole link tp expose --request printed")
	}
	if err := ValidApp(g.App); err != nil {
		return Grant{}, fmt.Errorf("the grant link's %v: it was not made by tp expose --request", err)
	}
	return g, nil
}

// Approve approves g from the enrolled device deviceID, signing with its key.
func Approve(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer, g Grant) (GrantResponse, error) {
	ts := time.Now().UTC().Format(time.RFC3339)
	appKey := base64.StdEncoding.EncodeToString(g.Key)
	sig, err := SignMessage(deviceKey, GrantMessage(deviceID, ts, appKey, g.Name, g.Public, g.App, g.Dial, g.Origin))
	if err != nil {
		return GrantResponse{}, err
	}
	var out GrantResponse
	err = postJSON(ctx, hc, serverURL+PathGrant, GrantRequest{DeviceID: deviceID, Time: ts, Signature: sig,
		AppKey: appKey, Name: g.Name, Public: g.Public, App: g.App, Dial: g.Dial, Origin: g.Origin}, &out)
	return out, err
}

// ErrGrantPending is GrantStatus's answer while no person approved the key.
var ErrGrantPending = errors.New("not approved yet")

// GrantStatus asks whether a person approved the application whose key is
// key: the device it was given, or ErrGrantPending.
func GrantStatus(ctx context.Context, hc *http.Client, serverURL string, key crypto.Signer) (GrantResponse, error) {
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return GrantResponse{}, err
	}
	pub := base64.StdEncoding.EncodeToString(der)
	ts := time.Now().UTC().Format(time.RFC3339)
	sig, err := SignMessage(key, GrantStatusMessage(pub, ts))
	if err != nil {
		return GrantResponse{}, err
	}
	var out GrantResponse
	err = postJSON(ctx, hc, serverURL+PathGrantStatus, GrantStatusRequest{PublicKey: pub, Time: ts, Signature: sig}, &out)
	if se := (*ServerError)(nil); errors.As(err, &se) && se.Code == CodeGrantPending {
		return GrantResponse{}, ErrGrantPending
	}
	return out, err
}

// GrantCertificate asks, signed by key, for a device certificate for key,
// granted a scope dial:NAME: the chain, leaf first, and when it ends.
func GrantCertificate(ctx context.Context, hc *http.Client, serverURL string, key crypto.Signer) ([]*x509.Certificate, GrantCertificateResponse, error) {
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, GrantCertificateResponse{}, err
	}
	pub := base64.StdEncoding.EncodeToString(der)
	ts := time.Now().UTC().Format(time.RFC3339)
	sig, err := SignMessage(key, GrantCertificateMessage(pub, ts))
	if err != nil {
		return nil, GrantCertificateResponse{}, err
	}
	var out GrantCertificateResponse
	err = postJSON(ctx, hc, serverURL+PathGrantCertificate, GrantStatusRequest{PublicKey: pub, Time: ts, Signature: sig}, &out)
	if se := (*ServerError)(nil); errors.As(err, &se) && se.Code == CodeGrantPending {
		return nil, out, ErrGrantPending
	} else if err != nil {
		return nil, out, err
	}
	var chain []*x509.Certificate
	for _, c := range out.Chain {
		b, err := base64.StdEncoding.DecodeString(c)
		if err != nil {
			return nil, out, fmt.Errorf("the server's certificate is not base64: %w", err)
		}
		crt, err := x509.ParseCertificate(b)
		if err != nil {
			return nil, out, fmt.Errorf("the server's certificate cannot be read: %w", err)
		}
		chain = append(chain, crt)
	}
	if len(chain) == 0 {
		return nil, out, errors.New("the server sent no certificate")
	}
	return chain, out, nil
}

// GrantsRequest asks, signed by an enrolled device's key, for the grants of
// its user.
type GrantsRequest struct {
	DeviceID  string `json:"device_id"`
	Time      string `json:"time"`
	Signature string `json:"signature"` // the device key's, over GrantsMessage
}

// GrantsMessage is what the device key signs to list its user's grants.
func GrantsMessage(deviceID, ts string) []byte {
	return []byte(grantsContext + "\x00" + deviceID + "\x00" + ts)
}

// GrantInfo is one grant: the device an approval created.
type GrantInfo struct {
	DeviceID  string    `json:"device_id"`
	Scope     string    `json:"scope"`
	GrantedBy string    `json:"granted_by"`
	Created   time.Time `json:"created"`
	LastLogin time.Time `json:"last_login,omitzero"`
	// Revoked: in the store, on the deny list, or with its approver.
	Revoked bool `json:"revoked"`
}

// GrantsResponse lists a user's grants, oldest first.
type GrantsResponse struct {
	Grants []GrantInfo `json:"grants"`
}

// GrantRevokeRequest revokes one of the user's grants, signed by an enrolled
// device's key.
type GrantRevokeRequest struct {
	DeviceID  string `json:"device_id"`
	Time      string `json:"time"`
	Signature string `json:"signature"` // the device key's, over GrantRevokeMessage
	Grant     string `json:"grant"`     // the grant's device ID
}

// GrantRevokeMessage is what the device key signs to revoke a grant.
func GrantRevokeMessage(deviceID, ts, grant string) []byte {
	return []byte(grantRevokeContext + "\x00" + deviceID + "\x00" + ts + "\x00" + grant)
}

// ListGrants asks for the grants of deviceID's user.
func ListGrants(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer) ([]GrantInfo, error) {
	ts := time.Now().UTC().Format(time.RFC3339)
	sig, err := SignMessage(deviceKey, GrantsMessage(deviceID, ts))
	if err != nil {
		return nil, err
	}
	var out GrantsResponse
	err = postJSON(ctx, hc, serverURL+PathGrants, GrantsRequest{DeviceID: deviceID, Time: ts, Signature: sig}, &out)
	return out.Grants, err
}

// RevokeGrant revokes grant, one of deviceID's user's grants, for good: the
// application's sessions end at once and its key can never be granted again.
func RevokeGrant(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer, grant string) (GrantInfo, error) {
	ts := time.Now().UTC().Format(time.RFC3339)
	sig, err := SignMessage(deviceKey, GrantRevokeMessage(deviceID, ts, grant))
	if err != nil {
		return GrantInfo{}, err
	}
	var out GrantInfo
	err = postJSON(ctx, hc, serverURL+PathGrantRevoke, GrantRevokeRequest{DeviceID: deviceID, Time: ts, Signature: sig, Grant: grant}, &out)
	return out, err
}
