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

// refreshSignIn is the sign-in a renewal gives the server when it asks for
// one: a fresh ID token from the provider by the refresh token the home
// keeps (its successor is kept in its place), else interactive (dlogin's,
// when set), else ErrSignInNeeded.
func (c *Client) refreshSignIn(ctx context.Context) (string, error) {
	st, ok, err := c.Home.SSO()
	if err != nil {
		return "", err
	}
	if ok && st.RefreshToken != "" {
		idp := &http.Client{Timeout: 30 * time.Second}
		t, err := login.Refresh(ctx, idp, st.SSOInfo, st.RefreshToken)
		if err == nil {
			st.RefreshToken = t.RefreshToken
			if err := c.Home.SaveSSO(st); err != nil {
				return "", fmt.Errorf("save the renewed sign-in in %s: %w", c.Home.Dir, err)
			}
			return t.IDToken, nil
		}
		if !errors.Is(err, login.ErrSignInEnded) {
			return "", err
		}
		st.RefreshToken = "" // spent: not tried again
		_ = c.Home.SaveSSO(st)
	}
	if c.SignIn == nil {
		return "", ErrSignInNeeded
	}
	if !ok { // the server asks, but the home kept nothing: ask the server where
		hc := login.HTTPClient(c.Root)
		defer hc.CloseIdleConnections()
		info, err := login.FetchSSO(ctx, hc, c.Profile.Server)
		if err != nil {
			return "", err
		}
		st = SSOState{SSOInfo: info}
	}
	t, err := c.SignIn(ctx, st.SSOInfo)
	if err != nil {
		return "", err
	}
	if st.KeepRefresh {
		st.RefreshToken = t.RefreshToken
	}
	if err := c.Home.SaveSSO(st); err != nil {
		return "", fmt.Errorf("save the sign-in in %s: %w", c.Home.Dir, err)
	}
	return t.IDToken, nil
}
