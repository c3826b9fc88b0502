package acme

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	stepacme "github.com/smallstep/certificates/acme"
	"github.com/smallstep/certificates/authority/provisioner"
)

// Website certificates. The sites served beside the proxy get their certificates
// by ordinary ACME (tls-alpn-01 or http-01) from the provisioner below when no
// public CA is configured. It signs nothing but the configured site names and
// the names an HTTP exposure holds at the time (CAOptions.SiteHeld), for
// serverAuth only, and its challenges are validated against tpd itself (the
// SiteValidator), never against whatever the name resolves to on the network.

// SitesProvisionerName is the ACME provisioner of website certificates; its
// directory is https://SERVER/acme/tp-sites/directory.
const SitesProvisionerName = "tp-sites"

const sitesProvisionerID = "tp-sites-provisioner"

// SiteCertLifetime is the lifetime of website certificates from the embedded CA;
// certmagic renews them in the last third.
const SiteCertLifetime = 24 * time.Hour

// SitesDirectoryPath is the path of the sites' ACME directory on tpd's HTTPS server.
func SitesDirectoryPath() string { return "/acme/" + SitesProvisionerName + "/directory" }

// SiteValidator reaches tpd's own listeners for the challenges of site names:
// TLSDial for tls-alpn-01 (the public TLS port) and Get for http-01 (the plain-HTTP
// port). Both receive the address or URL step-ca would have used on the network.
type SiteValidator interface {
	TLSDial(network, addr string, cfg *tls.Config) (*tls.Conn, error)
	Get(url string) (*http.Response, error)
}

// siteLeafTemplate is x509util.DefaultLeafTemplate without clientAuth: a website
// certificate chains to TP's root and must not pass for a client certificate.
const siteLeafTemplate = `{
	"subject": {{ toJson .Subject }},
	"sans": {{ toJson .SANs }},
{{- if typeIs "*rsa.PublicKey" .Insecure.CR.PublicKey }}
	"keyUsage": ["keyEncipherment", "digitalSignature"],
{{- else }}
	"keyUsage": ["digitalSignature"],
{{- end }}
	"extKeyUsage": ["serverAuth"]
}`

// sitesProvisioners is the websites' provisioner when on. Its names are not a
// static policy: they change on reload, so siteEnforcer checks each
// certificate against the live list (SetSiteNames), and siteClient validates
// challenges only for those names (any other name fails: errNoNetwork).
func sitesProvisioners(on bool) provisioner.List {
	if !on {
		return nil
	}
	return provisioner.List{&provisioner.ACME{
		ID:         sitesProvisionerID,
		Type:       "ACME",
		Name:       SitesProvisionerName,
		RequireEAB: true, // accounts only for tpd's own certmagic (NewSiteEAB)
		Challenges: []provisioner.ACMEChallenge{provisioner.TLS_ALPN_01, provisioner.HTTP_01},
		Claims: &provisioner.Claims{
			MinTLSDur:     &provisioner.Duration{Duration: 5 * time.Minute},
			MaxTLSDur:     &provisioner.Duration{Duration: SiteCertLifetime},
			DefaultTLSDur: &provisioner.Duration{Duration: SiteCertLifetime},
		},
		Options: &provisioner.Options{X509: &provisioner.X509Options{Template: siteLeafTemplate}},
	}}
}

// ErrSitesOff means the CA was started without the websites' provisioner.
var ErrSitesOff = errors.New("the embedded CA was started without the websites' provisioner")

// SetSiteNames replaces the names the websites' provisioner certifies. New
// orders and challenges see the new list at once; certificates already issued
// stay valid until they expire.
func (c *CA) SetSiteNames(names []string) error {
	if !c.sitesOn {
		return ErrSitesOff
	}
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[strings.TrimSuffix(strings.ToLower(n), ".")] = true
	}
	c.siteNames.Store(&m)
	return nil
}

// siteEnforcer refuses a certificate from the websites' provisioner whose
// names are not all configured sites or names held by an HTTP exposure now. It runs for every certificate the
// authority signs and passes those of other provisioners.
type siteEnforcer struct{ c *CA }

func (e siteEnforcer) Enforce(leaf *x509.Certificate) error {
	ext, ok := provisioner.GetProvisionerExtension(&x509.Certificate{Extensions: leaf.ExtraExtensions})
	if !ok {
		// Every provisioner of TP's CA writes its extension before enforcers run;
		// without it the certificate's source is unknown, so it is refused.
		return errors.New("the certificate carries no provisioner extension, so the CA cannot tell which rules apply to it")
	}
	if ext.Name != SitesProvisionerName {
		return nil
	}
	var names map[string]bool
	if p := e.c.siteNames.Load(); p != nil {
		names = *p
	}
	if len(leaf.IPAddresses)+len(leaf.EmailAddresses)+len(leaf.URIs) > 0 {
		return errors.New("a website certificate names DNS names only")
	}
	if len(leaf.DNSNames) == 0 {
		return errors.New("a website certificate needs a site name")
	}
	for _, n := range leaf.DNSNames {
		n = strings.ToLower(n)
		if !names[n] && !e.c.held(n) {
			return fmt.Errorf("%q is neither a configured site nor a name held by an HTTP exposure now", n)
		}
	}
	return nil
}

// NewSiteEAB mints a single-use external account binding for the sites' ACME account.
func (c *CA) NewSiteEAB(ctx context.Context) (keyID string, hmacKey []byte, err error) {
	eak, err := c.acmeDB.CreateExternalAccountKey(ctx, sitesProvisionerID, "")
	if err != nil {
		return "", nil, fmt.Errorf("create ACME account binding for the websites: %w", err)
	}
	return eak.ID, eak.HmacKey, nil
}

// siteClient validates the challenges of site names through a SiteValidator and
// hands everything else to the next challenge client.
type siteClient struct {
	stepacme.Client
	c *CA
	v SiteValidator
}

// isSite reports whether host is a configured site name or a name held by an
// HTTP exposure now.
func (c siteClient) isSite(host string) bool {
	host = strings.ToLower(host)
	p := c.c.siteNames.Load()
	return p != nil && (*p)[host] || c.c.held(host)
}

// held reports whether an HTTP exposure holds name now (CAOptions.SiteHeld).
func (c *CA) held(name string) bool { return c.siteHeld != nil && c.siteHeld(name) }

var _ stepacme.Client = siteClient{}

func (c siteClient) TLSDial(network, addr string, cfg *tls.Config) (*tls.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil || !c.isSite(host) {
		return c.Client.TLSDial(network, addr, cfg)
	}
	return c.v.TLSDial(network, addr, cfg)
}

func (c siteClient) Get(rawURL string) (*http.Response, error) {
	u, err := url.Parse(rawURL)
	if err != nil || !c.isSite(u.Hostname()) {
		return c.Client.Get(rawURL)
	}
	return c.v.Get(rawURL)
}

// challengeClientFor wraps the CA's challenge client with the site validator.
func (c *CA) challengeClientFor(next stepacme.Client) stepacme.Client {
	if c.siteValidator == nil {
		return next
	}
	return siteClient{Client: next, c: c, v: c.siteValidator}
}
