package config

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// Site is one website served on the public port beside the proxy: a static
// directory (Root) or a reverse proxy to an HTTP server (Upstream), never both.
type Site struct {
	// Name is the DNS name browsers use (the TLS SNI and the Host header).
	Name string `mapstructure:"name"`
	// Root is a directory served as static files.
	Root string `mapstructure:"root"`
	// Upstream is an http:// or https:// URL requests are forwarded to.
	Upstream string `mapstructure:"upstream"`
}

// DefaultSiteMaxBody bounds request bodies forwarded to an upstream.
const DefaultSiteMaxBody = 10 << 20

// SiteNames are the configured site names, in order.
func (s Server) SiteNames() []string {
	names := make([]string, 0, len(s.Sites))
	for _, site := range s.Sites {
		names = append(names, site.Name)
	}
	return names
}

// SitesDir is where site certificates and the ACME account are stored.
func (s Server) SitesDir() string { return s.DataDir + string(os.PathSeparator) + "sites" }

// validateSites checks the website settings; every problem names its setting.
func (s Server) validateSites() []error {
	var errs []error
	seen := map[string]bool{}
	for i, site := range s.Sites {
		where := fmt.Sprintf("sites[%d]", i)
		if site.Name != "" {
			where = fmt.Sprintf("sites[%d] (%s)", i, site.Name)
		}
		switch {
		case site.Name == "":
			errs = append(errs, fmt.Errorf("%s: name must be set to the DNS name browsers use, e.g. www.example.org", where))
		case !isDNSName(site.Name):
			errs = append(errs, fmt.Errorf("%s: name %q must be a DNS name in lower case (no IP address, port, wildcard or trailing dot)", where, site.Name))
		case seen[site.Name]:
			errs = append(errs, fmt.Errorf("%s: name %q is configured twice", where, site.Name))
		}
		seen[site.Name] = true
		switch {
		case site.Root == "" && site.Upstream == "":
			errs = append(errs, fmt.Errorf("%s: set root (a directory to serve) or upstream (a URL to forward to)", where))
		case site.Root != "" && site.Upstream != "":
			errs = append(errs, fmt.Errorf("%s: set either root or upstream, not both", where))
		case site.Root != "":
			if fi, err := os.Stat(site.Root); err != nil {
				errs = append(errs, fmt.Errorf("%s: root %s: %w", where, site.Root, err))
			} else if !fi.IsDir() {
				errs = append(errs, fmt.Errorf("%s: root %s is not a directory", where, site.Root))
			}
		default:
			u, err := url.Parse(site.Upstream)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
				errs = append(errs, fmt.Errorf("%s: upstream %q must be an http:// or https:// URL with a host and no query, e.g. http://127.0.0.1:3000", where, site.Upstream))
			}
		}
	}
	if s.DefaultSite != "" && !seen[s.DefaultSite] {
		errs = append(errs, fmt.Errorf("default-site %q must be the name of one of the sites", s.DefaultSite))
	}
	if s.ACMECA != "" {
		if u, err := url.Parse(s.ACMECA); err != nil || u.Scheme != "https" || u.Host == "" {
			errs = append(errs, fmt.Errorf("acme-ca %q must be the https:// URL of an ACME directory, e.g. https://acme-v02.api.letsencrypt.org/directory (empty: TP's embedded CA)", s.ACMECA))
		}
	}
	if s.ACMEEmail != "" && (!strings.Contains(s.ACMEEmail, "@") || strings.ContainsAny(s.ACMEEmail, " <>,")) {
		errs = append(errs, fmt.Errorf("acme-email %q must be a plain e-mail address", s.ACMEEmail))
	}
	if s.ACMECARoot != "" {
		if _, err := os.Stat(s.ACMECARoot); err != nil {
			errs = append(errs, fmt.Errorf("acme-ca-root: %w", err))
		}
	}
	if s.HTTPListen != "" {
		if _, port, err := net.SplitHostPort(s.HTTPListen); err != nil {
			errs = append(errs, fmt.Errorf("http-listen %q must be host:port, e.g. :80 (empty: no plain-HTTP listener)", s.HTTPListen))
		} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			errs = append(errs, fmt.Errorf("http-listen %q has an invalid port", s.HTTPListen))
		}
	}
	if s.SiteMaxBody < 1 {
		errs = append(errs, fmt.Errorf("site-max-body %d must be at least 1 byte", s.SiteMaxBody))
	}
	if s.SiteUpstreamTimeout <= 0 || s.SiteUpstreamTimeout > 10*time.Minute {
		errs = append(errs, fmt.Errorf("site-upstream-timeout %s must be between 0 and 10m", s.SiteUpstreamTimeout))
	}
	return errs
}

// isDNSName reports whether n is a lower-case DNS host name: labels of letters,
// digits and hyphens, not an IP address.
func isDNSName(n string) bool {
	if n == "" || len(n) > 253 || net.ParseIP(n) != nil || strings.HasSuffix(n, ".") {
		return false
	}
	for _, label := range strings.Split(n, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// siteYAML renders the website settings for tpd.yaml.
func siteYAML(b *strings.Builder, s Server) {
	b.WriteString("# Websites served on the public port beside the proxy (h2, http/1.1, h3): each is a\n" +
		"# static directory (root) or a reverse proxy (upstream). A site may use tpd's own name.\n")
	if len(s.Sites) == 0 {
		b.WriteString("sites: []\n#  - {name: www.example.org, root: /srv/www}\n#  - {name: app.example.org, upstream: \"http://127.0.0.1:3000\"}\n")
	} else {
		b.WriteString("sites:\n")
		for _, site := range s.Sites {
			if site.Root != "" {
				fmt.Fprintf(b, "  - {name: %q, root: %q}\n", site.Name, site.Root)
			} else {
				fmt.Fprintf(b, "  - {name: %q, upstream: %q}\n", site.Name, site.Upstream)
			}
		}
	}
	fmt.Fprintf(b, "# Site for a TLS name no site has; empty refuses such handshakes.\ndefault-site: %q\n", s.DefaultSite)
	fmt.Fprintf(b, "# ACME directory for site certificates; empty uses TP's embedded CA (browsers must trust its root).\n"+
		"# Production: https://acme-v02.api.letsencrypt.org/directory with acme-email set.\nacme-ca: %q\nacme-email: %q\n", s.ACMECA, s.ACMEEmail)
	fmt.Fprintf(b, "# Plain-HTTP listener (e.g. \":80\") that redirects to HTTPS and answers ACME http-01; empty: none.\nhttp-listen: %q\n", s.HTTPListen)
	fmt.Fprintf(b, "# Largest request body forwarded to an upstream (bytes), and how long an upstream may take to answer.\nsite-max-body: %d\nsite-upstream-timeout: %s\n", s.SiteMaxBody, s.SiteUpstreamTimeout)
}
