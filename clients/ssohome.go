package clients

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"time"

	"github.com/tp-proxy/tp/acme/login"
)

// ssoFile keeps, for a device enrolled by single sign-on on a server whose
// renewals need a fresh sign-in, where to sign in and the provider's refresh
// token (encrypted with the device key).
const ssoFile = "sso.json"

// SSOState is what a device keeps of its sign-in at the identity provider.
type SSOState struct {
	login.SSOInfo
	// RefreshToken is the provider's refresh token, "" when the server lets
	// devices keep none (each renewal is then an interactive sign-in).
	RefreshToken string `json:"-"`
}

type ssoFileJSON struct {
	login.SSOInfo
	// Refresh is the refresh token sealed with AES-256-GCM under a key
	// derived from the device key (refreshKey): the file alone gives nothing.
	Refresh string `json:"refresh,omitempty"`
}

// refreshKey derives the key that seals the refresh token from the device
// key, so that a copy of sso.json without the device key is useless.
func refreshKey(dev *ecdsa.PrivateKey) ([]byte, error) {
	b, err := dev.Bytes()
	if err != nil {
		return nil, err
	}
	k := sha256.Sum256(append([]byte("tp-sso-refresh-v1\x00"), b...))
	return k[:], nil
}

func sealRefresh(dev *ecdsa.PrivateKey, token string) (string, error) {
	gcm, err := refreshAEAD(dev)
	if err != nil {
		return "", err
	}
	nonce := make([]byte, gcm.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(gcm.Seal(nonce, nonce, []byte(token), []byte(ssoFile))), nil
}

func openRefresh(dev *ecdsa.PrivateKey, sealed string) (string, error) {
	gcm, err := refreshAEAD(dev)
	if err != nil {
		return "", err
	}
	b, err := base64.StdEncoding.DecodeString(sealed)
	if err != nil || len(b) < gcm.NonceSize() {
		return "", errors.New("the sealed refresh token is malformed")
	}
	plain, err := gcm.Open(nil, b[:gcm.NonceSize()], b[gcm.NonceSize():], []byte(ssoFile))
	if err != nil {
		return "", errors.New("the refresh token was sealed with another device key")
	}
	return string(plain), nil
}

func refreshAEAD(dev *ecdsa.PrivateKey) (cipher.AEAD, error) {
	k, err := refreshKey(dev)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// SaveSSO keeps st in the home, its refresh token sealed with the device key.
func (h Home) SaveSSO(st SSOState) error {
	out := ssoFileJSON{SSOInfo: st.SSOInfo}
	if st.RefreshToken != "" {
		dev, err := h.DeviceKey()
		if err != nil {
			return err
		}
		if out.Refresh, err = sealRefresh(dev, st.RefreshToken); err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	return login.WriteFileAtomic(h.path(ssoFile), append(b, '\n'), 0o600)
}

// SSO loads what the device keeps of its sign-in; ok is false when it keeps
// nothing (it was enrolled with a token, or its key alone renews it). A
// refresh token that cannot be opened is dropped (the next renewal signs in
// interactively).
func (h Home) SSO() (st SSOState, ok bool, err error) {
	b, err := os.ReadFile(h.path(ssoFile))
	if errors.Is(err, fs.ErrNotExist) {
		return SSOState{}, false, nil
	}
	if err != nil {
		return SSOState{}, false, err
	}
	var in ssoFileJSON
	if err := json.Unmarshal(b, &in); err != nil || in.Issuer == "" || in.ClientID == "" {
		return SSOState{}, false, fmt.Errorf("%s is damaged; run dlogin to sign in again", h.path(ssoFile))
	}
	st = SSOState{SSOInfo: in.SSOInfo}
	if in.Refresh != "" {
		dev, err := h.DeviceKey()
		if err != nil {
			return SSOState{}, false, err
		}
		if st.RefreshToken, err = openRefresh(dev, in.Refresh); err != nil {
			st.RefreshToken = ""
		}
	}
	return st, true, nil
}

// ErrSignInNeeded is a renewal that needs the person to sign in at the
// identity provider again: tp cannot ask them (ssh gives it no terminal).
var ErrSignInNeeded = errors.New("this device renews its certificate with a sign-in at your organisation's identity provider, and that sign-in has ended: run dlogin to sign in again")

// ssoLogin is one login's use of the sign-ins a device has: the enrollment's
// fresh ID token, the refresh token the home keeps, then the person
// (Client.SignIn). A refresh token from an interactive sign-in is kept only
// once the server took its ID token (commit), so that a sign-in as the wrong
// account does not leave that account's refresh token behind.
type ssoLogin struct {
	c       *Client
	tried   string    // what gave the last ID token: "fresh", "refresh" or "person"
	pending *SSOState // an interactive sign-in's state, kept by commit
}

// signIn answers the server's request for a sign-in (refused says why it
// asked: none sent, or the last one refused).
func (l *ssoLogin) signIn(ctx context.Context, refused *login.ServerError) (string, error) {
	c := l.c
	if l.tried == "person" { // the person's own sign-in was refused: say why
		return "", errors.New("the sign-in was refused")
	}
	if l.tried == "" && c.FreshIDToken != "" {
		l.tried = "fresh"
		return c.FreshIDToken, nil
	}
	st, ok, err := c.Home.SSO()
	if err != nil {
		c.logf("tp: %v; signing in anew", err)
		ok = false
	}
	if l.tried == "refresh" && ok && st.RefreshToken != "" {
		// The server refused the refreshed sign-in (another account, a
		// stale one): the refresh token is of no more use.
		st.RefreshToken = ""
		_ = c.Home.SaveSSO(st)
	}
	if l.tried == "" && ok && st.RefreshToken != "" {
		l.tried = "refresh"
		t, err := login.Refresh(ctx, &http.Client{Timeout: 30 * time.Second}, st.SSOInfo, st.RefreshToken)
		if err == nil {
			st.RefreshToken = t.RefreshToken // rotated: the old one may be spent
			if err := c.Home.SaveSSO(st); err != nil {
				return "", fmt.Errorf("save the renewed sign-in in %s: %w", c.Home.Dir, err)
			}
			return t.IDToken, nil
		}
		if !errors.Is(err, login.ErrSignInEnded) && !errors.Is(err, login.ErrNoIDToken) {
			return "", err
		}
		st.RefreshToken = "" // spent: not tried again
		_ = c.Home.SaveSSO(st)
	}
	if c.SignIn == nil {
		return "", ErrSignInNeeded
	}
	// Where to sign in is the server's word now: its provider or client may
	// have changed since the home kept them.
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections()
	info, err := login.FetchSSO(ctx, hc, c.Profile.Server)
	if err != nil {
		return "", err
	}
	l.tried = "person"
	t, err := c.SignIn(ctx, info)
	if err != nil {
		return "", err
	}
	next := SSOState{SSOInfo: info}
	if info.KeepRefresh {
		next.RefreshToken = t.RefreshToken
	}
	l.pending = &next
	return t.IDToken, nil
}

// commit keeps an interactive sign-in's state once the server took it.
func (l *ssoLogin) commit() error {
	if l.pending == nil {
		return nil
	}
	if err := l.c.Home.SaveSSO(*l.pending); err != nil {
		return fmt.Errorf("save the sign-in in %s: %w", l.c.Home.Dir, err)
	}
	return nil
}
