package config

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// The admin HTTP listener (admin-listen) serves /metrics, /healthz and /readyz.
// It is off by default. It must never share the public port, and it listens on
// loopback unless admin-listen-remote says otherwise: the counts it shows are
// no secret, but they are nobody else's business either (how busy the server is,
// how many devices fail to log in), and a probe or scraper on the same host or
// pod reaches loopback.

// validateAdmin checks admin-listen against the other listeners.
func (s Server) validateAdmin() []error {
	if s.AdminListen == "" {
		if s.AdminListenRemote {
			return []error{fmt.Errorf("admin-listen-remote is set but admin-listen is empty; set admin-listen (e.g. \":9443\") or drop admin-listen-remote")}
		}
		return nil
	}
	host, port, err := net.SplitHostPort(s.AdminListen)
	if err != nil {
		return []error{fmt.Errorf("admin-listen %q must be host:port, e.g. 127.0.0.1:9443 (empty: no admin HTTP listener)", s.AdminListen)}
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return []error{fmt.Errorf("admin-listen %q has an invalid port", s.AdminListen)}
	}
	var errs []error
	if !isLoopbackHost(host) && !s.AdminListenRemote {
		errs = append(errs, fmt.Errorf("admin-listen %q is not a loopback address: /metrics and the health checks would be reachable from other hosts; use 127.0.0.1:%s, or set admin-listen-remote: true if that is what you want (e.g. for Kubernetes probes)", s.AdminListen, port))
	}
	for _, other := range []struct{ key, addr string }{{"listen", s.Listen}, {"http-listen", s.HTTPListen}} {
		if sameListener(s.AdminListen, other.addr) {
			errs = append(errs, fmt.Errorf("admin-listen %q is the same address as %s %q; the admin listener must never be a public port: choose another port", s.AdminListen, other.key, other.addr))
		}
	}
	return errs
}

// isLoopbackHost reports whether host (of host:port) is a loopback IP address
// or "localhost". An empty host is every address.
func isLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// sameListener reports whether two host:port addresses could be the same
// socket: the same non-zero port, and the same host or either one on every
// address.
func sameListener(a, b string) bool {
	ha, pa, err1 := net.SplitHostPort(a)
	hb, pb, err2 := net.SplitHostPort(b)
	if err1 != nil || err2 != nil || pa != pb || pa == "0" {
		return false
	}
	any := func(h string) bool {
		ip := net.ParseIP(h)
		return h == "" || ip != nil && ip.IsUnspecified()
	}
	if any(ha) || any(hb) {
		return true
	}
	ia, ib := net.ParseIP(ha), net.ParseIP(hb)
	if ia != nil && ib != nil {
		return ia.Equal(ib)
	}
	return strings.EqualFold(ha, hb) || isLoopbackHost(ha) && isLoopbackHost(hb)
}

func adminYAML(b *strings.Builder, s Server) {
	fmt.Fprintf(b, "# Admin HTTP listener for /metrics (Prometheus), /healthz and /readyz, e.g. \"127.0.0.1:9443\";\n# empty: off. Never the public port; a non-loopback address needs admin-listen-remote: true.\nadmin-listen: %q\nadmin-listen-remote: %t\n", s.AdminListen, s.AdminListenRemote)
}
