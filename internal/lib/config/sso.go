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
	// SSOAllowedDomains are the email domains whose people may enrol; the
	// provider must have verified the email.
	SSOAllowedDomains []string `mapstructure:"sso-allowed-domains"`
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
	v.SetDefault("sso-allowed-domains", d.SSOAllowedDomains)
	v.SetDefault("sso-user-claim", d.SSOUserClaim)
	v.SetDefault("sso-groups-claim", d.SSOGroupsClaim)
}

// validateSSO checks the sign-in settings: with an issuer, a client and at
// least one domain are needed (a provider such as Google signs in anybody).
func (s Server) validateSSO() []error {
	if s.SSOIssuer == "" {
		if s.SSOClientID != "" || len(s.SSOAllowedDomains) > 0 {
			return []error{fmt.Errorf("sso-client-id or sso-allowed-domains is set but sso-issuer is empty; set sso-issuer to the identity provider's issuer URL, or drop them")}
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
		errs = append(errs, fmt.Errorf("sso-issuer is set but sso-client-id is empty; register TP at the identity provider as a public client with the device authorization grant and set its client ID"))
	}
	if len(s.SSOAllowedDomains) == 0 {
		errs = append(errs, fmt.Errorf("sso-issuer is set but sso-allowed-domains is empty; list the email domains whose people may enrol (e.g. [example.org]): many providers sign in anybody"))
	}
	for _, d := range s.SSOAllowedDomains {
		if d == "" || strings.ContainsAny(d, "@/:* ") {
			errs = append(errs, fmt.Errorf("sso-allowed-domains: %q is not a domain, e.g. example.org", d))
		}
	}
	if s.SSOUserClaim == "" || s.SSOGroupsClaim == "" {
		errs = append(errs, fmt.Errorf("sso-user-claim and sso-groups-claim must name claims of the ID token (defaults email and groups)"))
	}
	return errs
}

func ssoYAML(b *strings.Builder, s Server) {
	fmt.Fprintf(b, "# Sign-in with the organisation's OpenID Connect provider (dlogin --sso, docs/LOGIN.md): its issuer\n# URL, TP's client ID there (a public client allowed the device authorization grant), the email\n# domains whose people may enrol, the claim that names the TP user (an email gives its local part)\n# and the claim that lists its groups. \"\" turns it off; enrollment tokens work either way.\nsso-issuer: %q\nsso-client-id: %q\nsso-allowed-domains: [", s.SSOIssuer, s.SSOClientID)
	for i, d := range s.SSOAllowedDomains {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(b, "%q", d)
	}
	fmt.Fprintf(b, "]\nsso-user-claim: %q\nsso-groups-claim: %q\n", s.SSOUserClaim, s.SSOGroupsClaim)
}
