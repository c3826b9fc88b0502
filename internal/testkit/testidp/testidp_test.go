package testidp_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/tp-proxy/tp/internal/testkit/testidp"
)

// A device authorization approved at the provider yields an ID token for
// TP's client with the person's email and groups; one declined yields
// access_denied.
func TestDeviceGrant(t *testing.T) {
	t.Parallel()
	idp := testidp.Start(t, testidp.Person{Subject: "s1", Email: "alice@example.org", EmailVerified: true, Groups: []string{"ops"}})
	cfg := &oauth2.Config{ClientID: testidp.ClientID, Scopes: []string{"openid", "email", "profile"},
		Endpoint: oauth2.Endpoint{DeviceAuthURL: idp.Issuer + "/device_authorization", TokenURL: idp.Issuer + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	da, err := cfg.DeviceAuth(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := idp.Approve(ctx, da.UserCode, "s1"); err != nil {
		t.Fatal(err)
	}
	tok, err := cfg.DeviceAccessToken(ctx, da)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := tok.Extra("id_token").(string)
	parts := strings.Split(id, ".")
	if len(parts) != 3 {
		t.Fatalf("id_token %q is not a JWT", id)
	}
	body, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims struct {
		Aud    any      `json:"aud"`
		Email  string   `json:"email"`
		Groups []string `json:"groups"`
	}
	if err := json.Unmarshal(body, &claims); err != nil {
		t.Fatal(err)
	}
	if claims.Email != "alice@example.org" || len(claims.Groups) != 1 || claims.Groups[0] != "ops" {
		t.Fatalf("ID token claims %s; want alice's email and group ops", body)
	}

	da, err = cfg.DeviceAuth(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := idp.Deny(ctx, da.UserCode); err != nil {
		t.Fatal(err)
	}
	var re *oauth2.RetrieveError
	if _, err := cfg.DeviceAccessToken(ctx, da); err == nil || !errorsAs(err, &re) || re.ErrorCode != "access_denied" {
		t.Fatalf("a declined authorization gave %v; want access_denied", err)
	}
}

func errorsAs(err error, re **oauth2.RetrieveError) bool {
	r, ok := err.(*oauth2.RetrieveError)
	*re = r
	return ok
}
