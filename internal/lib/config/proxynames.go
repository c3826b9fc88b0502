package config

import (
	"fmt"
	"net"
	"strings"
)

// maxProxyNames bounds proxy-names: each one goes into tpd's certificate.
const maxProxyNames = 32

// validateProxyNames checks proxy-names. A proxy name asks every non-TP client
// for a device certificate, so it must never be a name browsers use for the
// website (one of names or a site), and it must not be claimable by devices
// (under reverse-zone).
func (s Server) validateProxyNames() []error {
	var errs []error
	if len(s.ProxyNames) > maxProxyNames {
		errs = append(errs, fmt.Errorf("proxy-names lists %d names; at most %d are allowed", len(s.ProxyNames), maxProxyNames))
	}
	z := strings.ToLower(strings.TrimSuffix(s.ReverseZone, "."))
	seen := map[string]bool{}
	for _, n := range s.ProxyNames {
		switch {
		case n == "":
			errs = append(errs, fmt.Errorf("proxy-names: an empty entry; remove it, or list DNS names such as proxy.example.org"))
			continue
		case net.ParseIP(n) != nil:
			errs = append(errs, fmt.Errorf("proxy-names: %q is an IP address; proxy names are chosen by TLS server name (SNI), which clients send only for DNS names, so use a DNS name such as proxy.example.org", n))
			continue
		case !isDNSName(n):
			errs = append(errs, fmt.Errorf("proxy-names: %q must be a DNS name in lower case (no port, wildcard or trailing dot), e.g. proxy.example.org", n))
			continue
		case seen[n]:
			errs = append(errs, fmt.Errorf("proxy-names: %q is listed twice; remove one", n))
			continue
		}
		seen[n] = true
		if s.isName(n) {
			errs = append(errs, fmt.Errorf("proxy-names: %q is also in names; a proxy name asks every client for a device certificate, so browsers would be prompted there: remove it from one of the lists (e.g. use proxy.%s as the proxy name)", n, n))
		}
		for _, site := range s.Sites {
			if strings.EqualFold(site.Name, n) {
				errs = append(errs, fmt.Errorf("proxy-names: %q is also a site; a proxy name asks every client for a device certificate, so the site's visitors would be prompted: choose another proxy name", n))
			}
		}
		if z != "" && (n == z || strings.HasSuffix(n, "."+z)) {
			errs = append(errs, fmt.Errorf("proxy-names: %q is under reverse-zone %q, where devices claim names with tp expose; choose a proxy name outside it", n, s.ReverseZone))
		}
	}
	return errs
}
