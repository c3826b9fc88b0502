package tpd

import (
	"strings"

	"github.com/tp-proxy/tp/proxy"
)

// connectUDPTemplate is the CONNECT-UDP template the discovery document
// advertises on base (https://proxyname:port): the configured one (a path on
// base, or a URL as given), else RFC 9298's default.
func connectUDPTemplate(base, configured string) string {
	switch {
	case configured == "":
		return base + proxy.ConnectUDPPath
	case strings.Contains(configured, "://"):
		return configured
	}
	return base + configured
}
