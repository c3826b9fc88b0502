package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The sign-in settings: off by default; with an issuer, a client and a
// domain are needed. Each bad case names what to set.
func TestSSOSettings(t *testing.T) {
	for _, c := range []struct {
		name, issuer, client, domain string
		want                         string // "" accepts
	}{
		{"off", "", "", "", ""},
		{"on", "https://accounts.example.org", "tp", "example.org", ""},
		{"loopback http (tests)", "http://127.0.0.1:9999", "tp", "example.org", ""},
		{"http elsewhere", "http://accounts.example.org", "tp", "example.org", "must be an https URL"},
		{"not a URL", "accounts.example.org", "tp", "example.org", "must be the identity provider's issuer URL"},
		{"no client", "https://accounts.example.org", "", "example.org", "sso-client-id is empty"},
		{"no domain", "https://accounts.example.org", "tp", "", "sso-domain is empty"},
		{"an address for a domain", "https://accounts.example.org", "tp", "alice@example.org", `"alice@example.org" is not one email domain`},
		{"a wildcard", "https://accounts.example.org", "tp", "*", `"*" is not one email domain`},
		{"two domains", "https://accounts.example.org", "tp", "example.org,example.com", "is not one email domain"},
		{"a Unicode domain", "https://accounts.example.org", "tp", "exampleſ.org", "is not one email domain"},
		{"client without issuer", "", "tp", "", "sso-issuer is empty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := DefaultServer()
			s.SSOIssuer, s.SSOClientID, s.SSODomain = c.issuer, c.client, c.domain
			err := s.Validate()
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("issuer %q, client %q, domain %q refused: %v", c.issuer, c.client, c.domain, err)
			case c.want != "" && err == nil:
				t.Fatalf("issuer %q, client %q, domain %q accepted", c.issuer, c.client, c.domain)
			case c.want != "" && !strings.Contains(err.Error(), c.want):
				t.Fatalf("error %q does not say %q", err, c.want)
			}
		})
	}
}

// The keys load from tpd.yaml, and tpd init's file lists them and reads back.
func TestSSOSettingsLoad(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte("sso-issuer: https://accounts.example.org\nsso-client-id: tp\nsso-domain: example.org\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	s, err := LoadServer(nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.SSOIssuer != "https://accounts.example.org" || s.SSOClientID != "tp" || s.SSODomain != "example.org" ||
		s.SSOUserClaim != "email" || s.SSOGroupsClaim != "groups" {
		t.Fatalf("loaded %+v", s.SSO)
	}
	if err := os.WriteFile(filepath.Join(dir, FileName), ServerYAML(s), 0o600); err != nil {
		t.Fatal(err)
	}
	again, err := LoadServer(nil)
	if err != nil {
		t.Fatalf("tpd.yaml as tpd init writes it does not load: %v\n%s", err, ServerYAML(s))
	}
	if again.SSOIssuer != s.SSOIssuer || again.SSODomain != s.SSODomain || again.SSOScopes != "openid email profile" {
		t.Fatalf("read back %+v; want %+v", again.SSO, s.SSO)
	}
}

// sso-scopes: the bad inputs are scopes without openid (no ID token would
// come back), a scope with a quote, and too many.
func TestSSOScopes(t *testing.T) {
	for _, c := range []struct {
		scopes, want string // want "" accepts
	}{
		{"openid email profile", ""},
		{"openid email profile groups", ""},
		{"  openid   groups ", ""},
		{"email profile", "lacks openid"},
		{"", "lacks openid"},
		{`openid "groups"`, `"\"groups\"" is not an OAuth scope`},
		{strings.Repeat("openid ", 17), "names 17 scopes; at most 16"},
	} {
		s := DefaultServer()
		s.SSOIssuer, s.SSOClientID, s.SSODomain, s.SSOScopes = "https://accounts.example.org", "tp", "example.org", c.scopes
		err := s.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("sso-scopes %q refused: %v", c.scopes, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("sso-scopes %q: %v; want an error saying %q", c.scopes, err, c.want)
		}
	}
	if got := (SSO{SSOScopes: " openid  groups "}).Scopes(); len(got) != 2 || got[0] != "openid" || got[1] != "groups" {
		t.Errorf("Scopes() = %q", got)
	}
}

// sso-renew is device-key or sign-in; the bad input is anything else (a
// typo must not silently renew by key).
func TestSSORenew(t *testing.T) {
	for _, c := range []struct{ renew, want string }{
		{"device-key", ""},
		{"sign-in", ""},
		{"signin", `sso-renew "signin": "device-key"`},
		{"", `sso-renew "": "device-key"`},
	} {
		s := DefaultServer()
		s.SSOIssuer, s.SSOClientID, s.SSODomain, s.SSORenew = "https://accounts.example.org", "tp", "example.org", c.renew
		err := s.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("sso-renew %q refused: %v", c.renew, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("sso-renew %q: %v; want an error saying %q", c.renew, err, c.want)
		}
	}
	if d := DefaultServer(); d.SSORenew != SSORenewDeviceKey || !d.SSOKeepRefresh {
		t.Errorf("defaults: sso-renew %q, sso-keep-refresh %v; want device-key and true", d.SSORenew, d.SSOKeepRefresh)
	}
}

// sso-max-devices bounds a user's devices enrolled by sign-in: 20 by
// default, loaded from tpd.yaml and written by tpd init. The bad inputs are
// 0 (no "unbounded" setting), a negative number and one above the maximum.
func TestSSOMaxDevices(t *testing.T) {
	for _, c := range []struct {
		n    int
		want string
	}{
		{1, ""},
		{20, ""},
		{MaxSSOMaxDevices, ""},
		{0, "sso-max-devices 0: between 1 and 1000"},
		{-1, "sso-max-devices -1: between 1 and 1000"},
		{MaxSSOMaxDevices + 1, "sso-max-devices 1001: between 1 and 1000"},
	} {
		s := DefaultServer()
		s.SSOIssuer, s.SSOClientID, s.SSODomain, s.SSOMaxDevices = "https://accounts.example.org", "tp", "example.org", c.n
		err := s.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("sso-max-devices %d refused: %v", c.n, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("sso-max-devices %d: %v; want an error saying %q", c.n, err, c.want)
		}
	}
	if d := DefaultServer(); d.SSOMaxDevices != 20 {
		t.Errorf("default sso-max-devices %d; want 20", d.SSOMaxDevices)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte("sso-issuer: https://accounts.example.org\nsso-client-id: tp\nsso-domain: example.org\nsso-max-devices: 5\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	s, err := LoadServer(nil)
	if err != nil || s.SSOMaxDevices != 5 {
		t.Fatalf("loaded sso-max-devices %d (%v); want 5", s.SSOMaxDevices, err)
	}
	if !strings.Contains(string(ServerYAML(s)), "\nsso-max-devices: 5\n") {
		t.Fatalf("tpd init's file lacks sso-max-devices: 5:\n%s", ServerYAML(s))
	}
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte("sso-issuer: https://accounts.example.org\nsso-client-id: tp\nsso-domain: example.org\nsso-max-devices: 0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadServer(nil); err == nil || !strings.Contains(err.Error(), "sso-max-devices 0") {
		t.Fatalf("tpd.yaml with sso-max-devices: 0 loaded (%v); want it refused", err)
	}
}
