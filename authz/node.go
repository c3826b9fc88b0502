package authz

import (
	"crypto/x509"
	"strings"
)

// NodeURIPrefix starts the one URI subjectAltName of a TP node certificate:
// "urn:tp:node:" and the instance's name. tpd signs node certificates itself
// with its CA's intermediate for the peer connections between instances
// (docs/SCALE.md, "Peering"); the CA's ACME provisioner never puts a URI in a
// certificate (ACME identifiers are DNS names, IP addresses and device IDs),
// so no device can obtain one, and IdentityFromCert refuses one as a device.
const NodeURIPrefix = "urn:tp:node:"

// NodeName returns the instance name of a node certificate, and whether leaf
// is one: exactly one URI SAN, with NodeURIPrefix and a non-empty name, and
// no device identity beside it.
func NodeName(leaf *x509.Certificate) (string, bool) {
	if leaf == nil || len(leaf.URIs) != 1 {
		return "", false
	}
	u := leaf.URIs[0].String()
	name, ok := strings.CutPrefix(u, NodeURIPrefix)
	if !ok || name == "" {
		return "", false
	}
	if ids, err := permanentIdentifiers(leaf); err != nil || len(ids) > 0 {
		return "", false
	}
	return name, true
}

// isNode reports whether leaf carries any node URI (even beside other names).
func isNode(leaf *x509.Certificate) bool {
	for _, u := range leaf.URIs {
		if strings.HasPrefix(u.String(), NodeURIPrefix) {
			return true
		}
	}
	return false
}
