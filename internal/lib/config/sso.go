package config

import (
	"fmt"
	"net/url"
	"strings"

	"github.com/spf13/viper"
)

// SSO lets people enrol a device by signing in with the organisation's
// OpenID Connect provider (dlogin --sso, docs/LOGIN.md). Empty sso-issuer
// turns it off; enrollment tokens work either way.
type SSO struct {
	// SSOIssuer is the provider's issuer URL (https); SSOClientID is TP's
	// client there: a public client (no secret) allowed the device
	// authorization grant.
	SSOIssuer   string `mapstructure:"sso-issuer"`
	SSOClientID string `mapstructure:"sso-client-id"`
	// SSODomain is the email domain whose people may enrol (the provider
	// must have verified the email); its local parts are TP's user names.
	SSODomain string `mapstructure:"sso-domain"`
	// SSOUserClaim names the TP user (an email gives its local part);
	// SSOGroupsClaim lists the user's groups, which replace the user's groups
	// at each sign-in.
	SSOUserClaim   string `mapstructure:"sso-user-claim"`
	SSOGroupsClaim string `mapstructure:"sso-groups-claim"`
	// SSOScopes are the scopes a sign-in asks for, separated by spaces; openid
	// among them. Some providers put the groups claim in the ID token only
	// when a scope asks for it (Dex and Okta: groups).
	SSOScopes string `mapstructure:"sso-scopes"`
	// SSORenew says what renews a device enrolled by single sign-on:
	// "device-key" (its key, as any device) or "sign-in" (a fresh sign-in at
	// the provider each time, so that a person the provider disabled loses
	// TP within a certificate's life). SSOKeepRefresh lets devices keep the
	// provider's refresh token (encrypted with the device key) so that
	// sign-in renewals need no browser while the provider allows them;
	// false makes every renewal an interactive sign-in (dlogin).
	SSORenew       string `mapstructure:"sso-renew"`
	SSOKeepRefresh bool   `mapstructure:"sso-keep-refresh"`
	// SSOGroupsRequired reads an ID token without the groups claim as "no
	// groups": some providers leave the claim out when a person has none,
	// and a group removed at the provider would otherwise stay in TP.
	SSOGroupsRequired bool `mapstructure:"sso-groups-required"`
	// SSOMaxDevices bounds a user's devices enrolled by sign-in that are not
	// revoked (1 to MaxSSOMaxDevices; no "unbounded": a sign-in, or an ID
	// token that leaked, must not be able to fill the user store).
	SSOMaxDevices int `mapstructure:"sso-max-devices"`
	// SSOGuestDomains are the email domains of guests, outside people with
	// whom a person may share one name they expose for a while (tp share,
	// docs/LOGIN.md section 7), separated by spaces or commas: a share with
	// an address needs its domain here, or "*" for any domain; a share with
	// a whole domain (@partner.example) needs that domain named. Empty lets
	// no guest in.
	SSOGuestDomains string `mapstructure:"sso-guest-domains"`
}

// GuestDomains is sso-guest-domains as a list, lower case.
func (s SSO) GuestDomains() []string {
	return strings.Fields(strings.ToLower(strings.ReplaceAll(s.SSOGuestDomains, ",", " ")))
}

// SSO renewal modes (sso-renew).
const (
	SSORenewDeviceKey = "device-key"
	SSORenewSignIn    = "sign-in"
)

// maxSSOScopes bounds sso-scopes.
const maxSSOScopes = 16

// MaxSSOMaxDevices is the highest sso-max-devices: more devices than anyone
// uses, few enough that one person cannot fill the store.
const MaxSSOMaxDevices = 1000

func defaultSSO() SSO {
	return SSO{SSOUserClaim: "email", SSOGroupsClaim: "groups", SSOScopes: "openid email profile",
		SSORenew: SSORenewDeviceKey, SSOKeepRefresh: true, SSOMaxDevices: 20}
}

// Scopes is sso-scopes as a list.
func (s SSO) Scopes() []string { return strings.Fields(s.SSOScopes) }

func setSSODefaults(v *viper.Viper, d SSO) {
	v.SetDefault("sso-issuer", d.SSOIssuer)
	v.SetDefault("sso-client-id", d.SSOClientID)
	v.SetDefault("sso-domain", d.SSODomain)
	v.SetDefault("sso-user-claim", d.SSOUserClaim)
	v.SetDefault("sso-groups-claim", d.SSOGroupsClaim)
	v.SetDefault("sso-scopes", d.SSOScopes)
	v.SetDefault("sso-renew", d.SSORenew)
	v.SetDefault("sso-keep-refresh", d.SSOKeepRefresh)
	v.SetDefault("sso-groups-required", d.SSOGroupsRequired)
	v.SetDefault("sso-max-devices", d.SSOMaxDevices)
	v.SetDefault("sso-guest-domains", d.SSOGuestDomains)
}

// validateSSO checks the sign-in settings: with an issuer, a client and a
// domain are needed (a provider such as Google signs in anybody).
func (s Server) validateSSO() []error {
	if s.SSOIssuer == "" {
		if s.SSOClientID != "" || s.SSODomain != "" || s.SSOGuestDomains != "" {
			return []error{fmt.Errorf("sso-client-id, sso-domain or sso-guest-domains is set but sso-issuer is empty; set sso-issuer to the identity provider's issuer URL, or drop them")}
		}
		return nil
	}
	var errs []error
	u, err := url.Parse(s.SSOIssuer)
	switch {
	case err != nil || u.Host == "" || u.RawQuery != "" || u.Fragment != "":
		errs = append(errs, fmt.Errorf("sso-issuer %q must be the identity provider's issuer URL, e.g. https://accounts.example.org", s.SSOIssuer))
	case u.Scheme != "https" && !(u.Scheme == "http" && isLoopbackHost(u.Hostname())):
		errs = append(errs, fmt.Errorf("sso-issuer %q must be an https URL: the provider's keys and discovery document come from it", s.SSOIssuer))
	}
	if s.SSOClientID == "" {
		errs = append(errs, fmt.Errorf("sso-issuer is set but sso-client-id is empty; register TP at the identity provider as a public (native) client with the redirect URI http://127.0.0.1/callback and the device authorization grant, and set its client ID"))
	}
	switch d := s.SSODomain; {
	case d == "":
		errs = append(errs, fmt.Errorf("sso-issuer is set but sso-domain is empty; name the email domain whose people may enrol (e.g. example.org): many providers sign in anybody"))
	case strings.ContainsAny(d, "@/:*, ") || strings.Trim(d, ".") != d || !strings.Contains(d, ".") || !isASCIIString(d):
		errs = append(errs, fmt.Errorf("sso-domain %q is not one email domain, e.g. example.org (one: people of several domains would share one name space of users)", d))
	}
	for _, g := range s.GuestDomains() {
		switch {
		case g == "*":
		case strings.ContainsAny(g, "@/:*") || strings.Trim(g, ".") != g || !strings.Contains(g, ".") || !isASCIIString(g):
			errs = append(errs, fmt.Errorf("sso-guest-domains: %q is not an email domain (e.g. partner.example), nor * for any", g))
		case strings.EqualFold(g, s.SSODomain):
			errs = append(errs, fmt.Errorf("sso-guest-domains: %q is sso-domain, whose people are the organisation's, not guests", g))
		}
	}
	if s.SSOUserClaim == "" || s.SSOGroupsClaim == "" {
		errs = append(errs, fmt.Errorf("sso-user-claim and sso-groups-claim must name claims of the ID token (defaults email and groups)"))
	}
	if err := checkScopes(s.Scopes()); err != nil {
		errs = append(errs, err)
	}
	if s.SSORenew != SSORenewDeviceKey && s.SSORenew != SSORenewSignIn {
		errs = append(errs, fmt.Errorf("sso-renew %q: %q (devices enrolled by sign-in renew with their key) or %q (each renewal needs a fresh sign-in at the provider)", s.SSORenew, SSORenewDeviceKey, SSORenewSignIn))
	}
	if n := s.SSOMaxDevices; n < 1 || n > MaxSSOMaxDevices {
		errs = append(errs, fmt.Errorf("sso-max-devices %d: between 1 and %d devices per user enrolled by sign-in (default 20); there is no unbounded setting", n, MaxSSOMaxDevices))
	}
	return errs
}

// checkScopes accepts at most maxSSOScopes OAuth scope tokens (RFC 6749,
// section 3.3: printable ASCII but '"' and '\\'), openid among them.
func checkScopes(scopes []string) error {
	if len(scopes) > maxSSOScopes {
		return fmt.Errorf("sso-scopes names %d scopes; at most %d", len(scopes), maxSSOScopes)
	}
	for _, sc := range scopes {
		for i := 0; i < len(sc); i++ {
			if c := sc[i]; c < 0x21 || c > 0x7e || c == '"' || c == '\\' {
				return fmt.Errorf("sso-scopes: %q is not an OAuth scope (printable ASCII without quotes or backslashes, separated by spaces)", sc)
			}
		}
	}
	for _, sc := range scopes {
		if sc == "openid" {
			return nil
		}
	}
	return fmt.Errorf("sso-scopes %q lacks openid: without it the provider gives no ID token; e.g. \"openid email profile groups\"", strings.Join(scopes, " "))
}

func ssoYAML(b *strings.Builder, s Server) {
	fmt.Fprintf(b, "# Sign-in with the organisation's OpenID Connect provider (dlogin --sso, docs/LOGIN.md): its issuer\n# URL, TP's client ID there (a public client with the redirect URI http://127.0.0.1/callback\n# and the device authorization grant), the email\n# domain whose people may enrol, the claim that names the TP user (an email gives its local part)\n# and the claim that lists its groups, and the scopes a sign-in asks for (add groups for Dex or Okta).\n# \"\" turns it off; enrollment tokens work either way.\nsso-issuer: %q\nsso-client-id: %q\nsso-domain: %q\nsso-user-claim: %q\nsso-groups-claim: %q\nsso-scopes: %q\n"+
		"# What renews a device enrolled by sign-in: \"device-key\", or \"sign-in\" (a fresh sign-in each time: a person the\n# provider disabled loses TP within 4 hours); with sign-in, whether devices keep the provider's refresh token\n# (encrypted with the device key) so that renewals need no browser; and whether an ID token\n# without the groups claim means no groups (providers that leave it out for people with none).\nsso-renew: %q\nsso-keep-refresh: %t\nsso-groups-required: %t\n"+
		"# The most devices one user may have enrolled by sign-in and not revoked (1 to 1000).\nsso-max-devices: %d\n"+
		"# Email domains of guests, with whom people may share one name they expose for a while (tp share): an\n# address's domain must be here (or * for any), a whole domain (@partner.example) named. \"\" lets no guest in.\nsso-guest-domains: %q\n",
		s.SSOIssuer, s.SSOClientID, s.SSODomain, s.SSOUserClaim, s.SSOGroupsClaim, s.SSOScopes, s.SSORenew, s.SSOKeepRefresh, s.SSOGroupsRequired, s.SSOMaxDevices, s.SSOGuestDomains)
}

func isASCIIString(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
