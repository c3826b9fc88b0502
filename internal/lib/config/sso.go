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
}

func defaultSSO() SSO { return SSO{SSOUserClaim: "email", SSOGroupsClaim: "groups"} }

func setSSODefaults(v *viper.Viper, d SSO) {
	v.SetDefault("sso-issuer", d.SSOIssuer)
	v.SetDefault("sso-client-id", d.SSOClientID)
	v.SetDefault("sso-domain", d.SSODomain)
	v.SetDefault("sso-user-claim", d.SSOUserClaim)
	v.SetDefault("sso-groups-claim", d.SSOGroupsClaim)
}

// validateSSO checks the sign-in settings: with an issuer, a client and a
// domain are needed (a provider such as Google signs in anybody).
func (s Server) validateSSO() []error {
	if s.SSOIssuer == "" {
		if s.SSOClientID != "" || s.SSODomain != "" {
			return []error{fmt.Errorf("sso-client-id or sso-domain is set but sso-issuer is empty; set sso-issuer to the identity provider's issuer URL, or drop them")}
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
	if s.SSOUserClaim == "" || s.SSOGroupsClaim == "" {
		errs = append(errs, fmt.Errorf("sso-user-claim and sso-groups-claim must name claims of the ID token (defaults email and groups)"))
	}
	return errs
}

func ssoYAML(b *strings.Builder, s Server) {
	fmt.Fprintf(b, "# Sign-in with the organisation's OpenID Connect provider (dlogin --sso, docs/LOGIN.md): its issuer\n# URL, TP's client ID there (a public client with the redirect URI http://127.0.0.1/callback\n# and the device authorization grant), the email\n# domain whose people may enrol, the claim that names the TP user (an email gives its local part)\n# and the claim that lists its groups. \"\" turns it off; enrollment tokens work either way.\nsso-issuer: %q\nsso-client-id: %q\nsso-domain: %q\nsso-user-claim: %q\nsso-groups-claim: %q\n",
		s.SSOIssuer, s.SSOClientID, s.SSODomain, s.SSOUserClaim, s.SSOGroupsClaim)
}

func isASCIIString(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
