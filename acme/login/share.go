package login

import (
	"context"
	"crypto"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"time"
)

// Guest shares: a person who may keep a reverse name exposed gives it to one
// outside person, or to anyone at one email domain, for a limited time
// (docs/LOGIN.md, "Guest shares"). The person shares from an enrolled device
// (PathShare, signed by its key); the guest signs in with the identity
// provider (dlogin --sso) and gets a device that may connect to that one name
// (scope guest:NAME) until the share ends; the person lists (PathShares) and
// revokes (PathShareRevoke) their shares, and a revocation ends the guest's
// sessions at once.
const (
	PathShare       = "/tp/v1/share"
	PathShares      = "/tp/v1/shares"
	PathShareRevoke = "/tp/v1/share/revoke"
	// PathShareWeb shares a name from the website's grants page
	// (PathGrantsPage), after a sign-in; its revoke buttons post to
	// PathGrantRevokePage.
	PathShareWeb = "/grant/share"
	// MaxShareFor bounds how long a share lasts.
	MaxShareFor = 30 * 24 * time.Hour
)

const (
	shareContext       = "tp-share-v1"
	sharesContext      = "tp-shares-v1"
	shareRevokeContext = "tp-share-revoke-v1"
)

// ShareRequest shares a reverse name with a guest, signed by an enrolled
// device's key. ID is the client's choice (NewShareID), so that the same
// request sent twice makes one share.
type ShareRequest struct {
	DeviceID  string `json:"device_id"`
	Time      string `json:"time"`      // RFC 3339, within 5 minutes of the server's clock
	Signature string `json:"signature"` // the device key's, over ShareMessage
	ID        string `json:"id"`        // "share-" and 12 lower-case hex digits
	Name      string `json:"name"`      // the reverse name's label
	Guest     string `json:"guest"`     // "bob@example.com", or "@example.com" for anyone at that domain
	Until     string `json:"until"`     // RFC 3339: when the share ends, at most MaxShareFor from now
}

// ShareMessage is what the device key signs to share.
func ShareMessage(deviceID, ts, id, name, guest, until string) []byte {
	return []byte(fmt.Sprintf("%s\x00%s\x00%s\x00%s\x00%s\x00%s\x00%s", shareContext, deviceID, ts, id, name, guest, until))
}

// ShareInfo is one share, as its person sees it.
type ShareInfo struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	// Host is the name the guest connects to (NAME.<reverse zone>).
	Host    string    `json:"host"`
	Guest   string    `json:"guest"`
	By      string    `json:"by"` // the approving device, or sign-in:SUBJECT
	Created time.Time `json:"created"`
	Until   time.Time `json:"until"`
	// State is "active", "revoked" or "ended" (past Until, or its approver
	// was revoked).
	State string `json:"state"`
	// Guests are the devices guests enrolled with the share.
	Guests []string `json:"guests"`
}

// SharesRequest asks, signed by an enrolled device's key, for its user's
// shares.
type SharesRequest struct {
	DeviceID  string `json:"device_id"`
	Time      string `json:"time"`
	Signature string `json:"signature"` // over SharesMessage
}

// SharesMessage is what the device key signs to list its user's shares.
func SharesMessage(deviceID, ts string) []byte {
	return []byte(sharesContext + "\x00" + deviceID + "\x00" + ts)
}

// SharesResponse lists a user's shares, oldest first.
type SharesResponse struct {
	Shares []ShareInfo `json:"shares"`
}

// ShareRevokeRequest ends one of the user's shares, signed by an enrolled
// device's key.
type ShareRevokeRequest struct {
	DeviceID  string `json:"device_id"`
	Time      string `json:"time"`
	Signature string `json:"signature"` // over ShareRevokeMessage
	Share     string `json:"share"`
}

// ShareRevokeMessage is what the device key signs to revoke a share.
func ShareRevokeMessage(deviceID, ts, share string) []byte {
	return []byte(shareRevokeContext + "\x00" + deviceID + "\x00" + ts + "\x00" + share)
}

// NewShareID is a fresh share ID.
func NewShareID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "share-" + hex.EncodeToString(b[:])
}

// Share shares name with guest until the given time, from the enrolled
// device deviceID.
func Share(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer, name, guest string, until time.Time) (ShareInfo, error) {
	ts := time.Now().UTC().Format(time.RFC3339)
	id, u := NewShareID(), until.UTC().Format(time.RFC3339)
	sig, err := SignMessage(deviceKey, ShareMessage(deviceID, ts, id, name, guest, u))
	if err != nil {
		return ShareInfo{}, err
	}
	var out ShareInfo
	err = postJSON(ctx, hc, serverURL+PathShare, ShareRequest{DeviceID: deviceID, Time: ts, Signature: sig, ID: id, Name: name, Guest: guest, Until: u}, &out)
	return out, err
}

// ListShares asks for the shares of deviceID's user.
func ListShares(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer) ([]ShareInfo, error) {
	ts := time.Now().UTC().Format(time.RFC3339)
	sig, err := SignMessage(deviceKey, SharesMessage(deviceID, ts))
	if err != nil {
		return nil, err
	}
	var out SharesResponse
	err = postJSON(ctx, hc, serverURL+PathShares, SharesRequest{DeviceID: deviceID, Time: ts, Signature: sig}, &out)
	return out.Shares, err
}

// RevokeShare ends share, one of deviceID's user's, for good: its guests'
// sessions end at once.
func RevokeShare(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer, share string) (ShareInfo, error) {
	ts := time.Now().UTC().Format(time.RFC3339)
	sig, err := SignMessage(deviceKey, ShareRevokeMessage(deviceID, ts, share))
	if err != nil {
		return ShareInfo{}, err
	}
	var out ShareInfo
	err = postJSON(ctx, hc, serverURL+PathShareRevoke, ShareRevokeRequest{DeviceID: deviceID, Time: ts, Signature: sig, Share: share}, &out)
	return out, err
}
