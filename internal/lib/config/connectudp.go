package config

import (
	"fmt"
	"strings"
)

// validateConnectUDP checks the CONNECT-UDP settings (docs/HTTP.md, section 5).
// The template's full check runs when tpd builds the proxy; this one catches
// the mistakes a person makes when writing one.
func (s Server) validateConnectUDP() []error {
	var errs []error
	if t := s.ConnectUDPTemplate; t != "" {
		path := t
		if i := strings.Index(t, "://"); i >= 0 {
			j := strings.IndexByte(t[i+3:], '/')
			path = ""
			if j >= 0 {
				path = t[i+3+j:]
			}
		}
		if !strings.HasPrefix(path, "/") || strings.Count(t, "{target_host}") != 1 || strings.Count(t, "{target_port}") != 1 {
			errs = append(errs, fmt.Errorf("connect-udp-template %q must be a path (or https URL) that uses {target_host} and {target_port} once each, e.g. /masque?h={target_host}&p={target_port}", t))
		}
	}
	if s.ConnectUDPMaxDatagram < 0 || s.ConnectUDPMaxDatagram > 65527 {
		errs = append(errs, fmt.Errorf("connect-udp-max-datagram %d must be between 1 and 65527 (the largest UDP payload), or 0 for 65507 (the largest over IPv4)", s.ConnectUDPMaxDatagram))
	}
	if s.ConnectUDPMaxPPS < 0 || s.ConnectUDPMaxPPS > 10_000_000 {
		errs = append(errs, fmt.Errorf("connect-udp-packets-per-second %d must be between 1 and 10000000, or 0 for 20000", s.ConnectUDPMaxPPS))
	}
	return errs
}

func connectUDPYAML(b *strings.Builder, s Server) {
	fmt.Fprintf(b, "# CONNECT-UDP (RFC 9298) on the proxy names: a URI template accepted besides\n# /.well-known/masque/udp/{target_host}/{target_port}/ (\"\" for none), the largest UDP payload\n# relayed (larger ones are dropped and counted; 0: 65507) and datagrams per second per flow and\n# direction (0: 20000).\nconnect-udp-template: %q\nconnect-udp-max-datagram: %d\nconnect-udp-packets-per-second: %d\n",
		s.ConnectUDPTemplate, s.ConnectUDPMaxDatagram, s.ConnectUDPMaxPPS)
}
