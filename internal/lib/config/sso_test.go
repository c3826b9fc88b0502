package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// The sign-in settings: off by default; with an issuer, a client and a
// domain are needed. Each bad case names what to set.
func TestSSOSettings(t *testing.T) {
	for _, c := range []struct {
		name, issuer, client string
		domains              []string
		want                 string // "" accepts
	}{
		{"off", "", "", nil, ""},
		{"on", "https://accounts.example.org", "tp", []string{"example.org"}, ""},
		{"loopback http (tests)", "http://127.0.0.1:9999", "tp", []string{"example.org"}, ""},
		{"http elsewhere", "http://accounts.example.org", "tp", []string{"example.org"}, "must be an https URL"},
		{"not a URL", "accounts.example.org", "tp", []string{"example.org"}, "must be the identity provider's issuer URL"},
		{"no client", "https://accounts.example.org", "", []string{"example.org"}, "sso-client-id is empty"},
		{"no domain", "https://accounts.example.org", "tp", nil, "sso-allowed-domains is empty"},
		{"an address for a domain", "https://accounts.example.org", "tp", []string{"alice@example.org"}, `"alice@example.org" is not a domain`},
		{"a wildcard", "https://accounts.example.org", "tp", []string{"*"}, `"*" is not a domain`},
		{"client without issuer", "", "tp", nil, "sso-issuer is empty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := DefaultServer()
			s.SSOIssuer, s.SSOClientID, s.SSOAllowedDomains = c.issuer, c.client, c.domains
			err := s.Validate()
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("issuer %q, client %q, domains %q refused: %v", c.issuer, c.client, c.domains, err)
			case c.want != "" && err == nil:
				t.Fatalf("issuer %q, client %q, domains %q accepted", c.issuer, c.client, c.domains)
			case c.want != "" && !strings.Contains(err.Error(), c.want):
				t.Fatalf("error %q does not say %q", err, c.want)
			}
		})
	}
}

// The keys load from tpd.yaml, and tpd init's file lists them and reads back.
func TestSSOSettingsLoad(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte("sso-issuer: https://accounts.example.org\nsso-client-id: tp\nsso-allowed-domains: [example.org, example.com]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	s, err := LoadServer(nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.SSOIssuer != "https://accounts.example.org" || s.SSOClientID != "tp" || !slices.Equal(s.SSOAllowedDomains, []string{"example.org", "example.com"}) ||
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
	if again.SSOIssuer != s.SSOIssuer || !slices.Equal(again.SSOAllowedDomains, s.SSOAllowedDomains) {
		t.Fatalf("read back %+v; want %+v", again.SSO, s.SSO)
	}
}
