package login

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"golang.org/x/oauth2"
)

// ErrNoSSO is a server that does not sign people in with an identity
// provider (its answer to PathSSO is 404).
var ErrNoSSO = errors.New("this TP server does not sign people in with an identity provider")

// FetchSSO asks the server how its people sign in (PathSSO).
func FetchSSO(ctx context.Context, hc *http.Client, serverURL string) (SSOInfo, error) {
	body, err := get(ctx, hc, serverURL+PathSSO)
	var se *ServerError
	if errors.As(err, &se) && se.Status == http.StatusNotFound {
		return SSOInfo{}, fmt.Errorf("%w: ask your TP administrator for an enrollment (tpd enroll USER --device NAME) and run the dlogin line it prints", ErrNoSSO)
	}
	if err != nil {
		return SSOInfo{}, err
	}
	var info SSOInfo
	if err := json.Unmarshal(body, &info); err != nil || info.Issuer == "" || info.ClientID == "" {
		return SSOInfo{}, fmt.Errorf("%s answered without an issuer and client: is this tpd?", serverURL+PathSSO)
	}
	return info, nil
}

// DeviceCode is what a person does to approve a sign-in: open URL (or
// Complete, which carries the code) and enter Code.
type DeviceCode struct {
	URL, Complete, Code string
}

// SignIn signs a person in with the provider by the device authorization
// grant (RFC 8628): show is given the page to open and the code to enter,
// and SignIn waits (polling the provider, until ctx ends or the code
// expires) for the person to approve it, then returns the ID token. idp
// reaches the provider.
func SignIn(ctx context.Context, idp *http.Client, info SSOInfo, show func(DeviceCode)) (Tokens, error) {
	meta, err := providerMetadata(ctx, idp, info.Issuer)
	if err != nil {
		return Tokens{}, err
	}
	if meta.DeviceEndpoint == "" {
		return Tokens{}, fmt.Errorf("the identity provider %s does not offer the device authorization grant (RFC 8628), which dlogin --sso uses: ask your TP administrator", info.Issuer)
	}
	cfg := &oauth2.Config{ClientID: info.ClientID, Scopes: info.Scopes, Endpoint: oauth2.Endpoint{
		DeviceAuthURL: meta.DeviceEndpoint, TokenURL: meta.TokenEndpoint, AuthStyle: oauth2.AuthStyleInParams}}
	ctx = context.WithValue(ctx, oauth2.HTTPClient, idp)
	da, err := cfg.DeviceAuth(ctx)
	if err != nil {
		return Tokens{}, fmt.Errorf("the identity provider %s refused to start a sign-in: %w", info.Issuer, explainOAuth(err))
	}
	show(DeviceCode{URL: da.VerificationURI, Complete: da.VerificationURIComplete, Code: da.UserCode})
	tok, err := cfg.DeviceAccessToken(ctx, da)
	if err != nil {
		var re *oauth2.RetrieveError
		switch {
		case errors.As(err, &re) && re.ErrorCode == "access_denied":
			return Tokens{}, errors.New("the sign-in was declined at the identity provider; nothing was enrolled")
		case errors.As(err, &re) && re.ErrorCode == "expired_token", errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil:
			return Tokens{}, errors.New("the code expired before the sign-in was approved: run dlogin --sso again and approve it sooner")
		case ctx.Err() != nil:
			return Tokens{}, fmt.Errorf("waiting for the sign-in to be approved: %w", ctx.Err())
		}
		return Tokens{}, fmt.Errorf("the identity provider %s did not complete the sign-in: %w", info.Issuer, explainOAuth(err))
	}
	return tokensOf(tok, info)
}

// Tokens are what a sign-in gives a device: the person's ID token, and the
// provider's refresh token when it gave one (scope offline_access).
type Tokens struct {
	IDToken, RefreshToken string
}

// ErrNoIDToken is a provider's answer without an ID token (no scope
// openid, or a provider that sends none on a refresh).
var ErrNoIDToken = errors.New("the identity provider answered without an ID token")

// tokensOf reads a token response.
func tokensOf(tok *oauth2.Token, info SSOInfo) (Tokens, error) {
	id, _ := tok.Extra("id_token").(string)
	if id == "" {
		return Tokens{}, fmt.Errorf("%w (%s; scope openid): ask your TP administrator", ErrNoIDToken, info.Issuer)
	}
	return Tokens{IDToken: id, RefreshToken: tok.RefreshToken}, nil
}

// ErrSignInEnded is a refresh token the provider no longer honours (it
// expired, was revoked, or the person was disabled): only an interactive
// sign-in renews the device now.
var ErrSignInEnded = errors.New("the sign-in at the identity provider has ended")

// Refresh gets a fresh ID token from the provider with a refresh token, with
// no person involved; the answer's refresh token replaces the old one (it
// is the old one when the provider does not rotate them). A token the
// provider refuses is ErrSignInEnded.
func Refresh(ctx context.Context, idp *http.Client, info SSOInfo, refreshToken string) (Tokens, error) {
	meta, err := providerMetadata(ctx, idp, info.Issuer)
	if err != nil {
		return Tokens{}, err
	}
	cfg := &oauth2.Config{ClientID: info.ClientID, Scopes: info.Scopes, Endpoint: oauth2.Endpoint{
		TokenURL: meta.TokenEndpoint, AuthStyle: oauth2.AuthStyleInParams}}
	tok, err := cfg.TokenSource(context.WithValue(ctx, oauth2.HTTPClient, idp), &oauth2.Token{RefreshToken: refreshToken}).Token()
	if err != nil {
		var re *oauth2.RetrieveError
		if errors.As(err, &re) && (re.ErrorCode == "invalid_grant" || re.ErrorCode == "unauthorized_client") {
			return Tokens{}, fmt.Errorf("%w (%v)", ErrSignInEnded, explainOAuth(err))
		}
		return Tokens{}, fmt.Errorf("the identity provider %s did not renew the sign-in: %w", info.Issuer, explainOAuth(err))
	}
	t, err := tokensOf(tok, info)
	if err != nil {
		return Tokens{}, err
	}
	if t.RefreshToken == "" {
		t.RefreshToken = refreshToken
	}
	return t, nil
}

// explainOAuth keeps a provider's error code and description, without the
// raw response.
func explainOAuth(err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) && re.ErrorCode != "" {
		if re.ErrorDescription != "" {
			return fmt.Errorf("%s: %s", re.ErrorCode, re.ErrorDescription)
		}
		return errors.New(re.ErrorCode)
	}
	return err
}

// providerMeta is what dlogin reads of a provider's discovery document.
type providerMeta struct {
	Issuer         string `json:"issuer"`
	AuthEndpoint   string `json:"authorization_endpoint"`
	TokenEndpoint  string `json:"token_endpoint"`
	DeviceEndpoint string `json:"device_authorization_endpoint"`
}

// providerMetadata fetches the provider's discovery document; its issuer
// must be the one tpd named.
func providerMetadata(ctx context.Context, idp *http.Client, issuer string) (providerMeta, error) {
	url := strings.TrimSuffix(issuer, "/") + "/.well-known/openid-configuration"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return providerMeta{}, fmt.Errorf("the TP server names an identity provider that is not a URL (%q): ask your TP administrator", issuer)
	}
	resp, err := idp.Do(req)
	if err != nil {
		return providerMeta{}, fmt.Errorf("cannot reach the identity provider %s: %w", issuer, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return providerMeta{}, fmt.Errorf("reading the identity provider's discovery document %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK || len(body) > maxResponse {
		return providerMeta{}, fmt.Errorf("the identity provider's discovery document %s answered %s", url, resp.Status)
	}
	var m providerMeta
	if err := json.Unmarshal(body, &m); err != nil {
		return providerMeta{}, fmt.Errorf("the identity provider's discovery document %s is not JSON: %w", url, err)
	}
	if strings.TrimSuffix(m.Issuer, "/") != strings.TrimSuffix(issuer, "/") {
		return providerMeta{}, fmt.Errorf("the identity provider at %s calls itself %q: refusing it (the TP server's sso-issuer must be the provider's own issuer)", issuer, m.Issuer)
	}
	if m.TokenEndpoint == "" {
		return providerMeta{}, fmt.Errorf("the identity provider's discovery document %s names no token endpoint", url)
	}
	return m, nil
}

// EnrollDeviceSSO registers deviceKey's public half as device of the person
// idToken names.
func EnrollDeviceSSO(ctx context.Context, hc *http.Client, serverURL, idToken, device string, deviceKey crypto.Signer) (EnrollSSOResponse, error) {
	return EnrollDeviceSSOShare(ctx, hc, serverURL, idToken, device, "", deviceKey)
}

// EnrollDeviceSSOShare is EnrollDeviceSSO for a guest, a person outside the
// server's domain, who picks the name shared with them (share, a reverse
// name's label; empty takes the only one).
func EnrollDeviceSSOShare(ctx context.Context, hc *http.Client, serverURL, idToken, device, share string, deviceKey crypto.Signer) (EnrollSSOResponse, error) {
	pubDER, err := x509.MarshalPKIXPublicKey(deviceKey.Public())
	if err != nil {
		return EnrollSSOResponse{}, err
	}
	pub := base64.StdEncoding.EncodeToString(pubDER)
	sig, err := SignMessage(deviceKey, EnrollSSOMessage(idToken, device, pub))
	if err != nil {
		return EnrollSSOResponse{}, err
	}
	var out EnrollSSOResponse
	err = postJSON(ctx, hc, serverURL+PathEnrollSSO, EnrollSSORequest{IDToken: idToken, Device: device, PublicKey: pub, Signature: sig, Share: share}, &out)
	return out, err
}
