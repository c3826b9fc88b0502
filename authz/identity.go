package authz

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
)

// MaxNameLen is the longest user or device name.
const MaxNameLen = 63

// ValidName reports whether s can be a user or device name: 1 to 63 characters,
// lower-case letters, digits, '.', '_' or '-', starting with a letter or digit.
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > MaxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9':
		case (c == '.' || c == '_' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}

// DeviceID joins a user and a device name into a device ID, "user@device". It does
// not validate; see [SplitDeviceID].
func DeviceID(user, device string) string { return user + "@" + device }

// SplitDeviceID splits and validates a device ID of the form "user@device".
func SplitDeviceID(id string) (user, device string, err error) {
	user, device, ok := strings.Cut(id, "@")
	if !ok {
		return "", "", fmt.Errorf("device ID %q is not of the form user@device", id)
	}
	if !ValidName(user) {
		return "", "", fmt.Errorf("device ID %q has an invalid user name %q: %s", id, user, nameRule)
	}
	if !ValidName(device) {
		return "", "", fmt.Errorf("device ID %q has an invalid device name %q: %s", id, device, nameRule)
	}
	return user, device, nil
}

const nameRule = "names are 1 to 63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"

// DeviceIDOf is the one device ID ("user@device") in cert's
// subjectAltName, with none of IdentityFromCert's other checks (for a
// certificate being made).
func DeviceIDOf(cert *x509.Certificate) (string, error) {
	ids, err := permanentIdentifiers(cert)
	if err != nil {
		return "", err
	}
	if len(ids) != 1 {
		return "", fmt.Errorf("%d device identities, not one", len(ids))
	}
	if _, _, err := SplitDeviceID(ids[0]); err != nil {
		return "", err
	}
	return ids[0], nil
}

// IdentityFromCert reads the TP identity from a client certificate whose chain the
// caller has already verified. The certificate must carry exactly one RFC 4043
// permanentIdentifier SAN holding a valid device ID, be valid for clientAuth, and
// have a Subject CN that is empty or equal to the device ID. Groups are left empty;
// they come from the [Directory] (see [Verify]).
func IdentityFromCert(leaf *x509.Certificate) (Identity, error) {
	if leaf == nil {
		return Identity{}, errors.New("no client certificate was presented; run dlogin to get one")
	}
	if isNode(leaf) {
		return Identity{}, errors.New("this is a TP node certificate (of a TP server instance), which is never accepted as a device; run dlogin for a device certificate")
	}
	ids, err := permanentIdentifiers(leaf)
	if err != nil {
		return Identity{}, fmt.Errorf("client certificate's subject alternative names cannot be read (%v); run dlogin for a new certificate", err)
	}
	switch n := len(ids); n {
	case 0:
		return Identity{}, errors.New("client certificate carries no TP device identity; run dlogin to get one")
	case 1:
	default:
		return Identity{}, fmt.Errorf("client certificate carries %d device identities where TP allows one; run dlogin for a new certificate", n)
	}
	id := ids[0]
	user, device, err := SplitDeviceID(id)
	if err != nil {
		return Identity{}, fmt.Errorf("client certificate carries an invalid device identity: %w", err)
	}
	if !hasClientAuth(leaf) {
		return Identity{}, fmt.Errorf("certificate for %s is not valid for client authentication (no clientAuth extended key usage); run dlogin for a client certificate", id)
	}
	if cn := leaf.Subject.CommonName; cn != "" && cn != id {
		return Identity{}, fmt.Errorf("client certificate names %q in its subject but %q as its device identity; run dlogin for a new certificate", cn, id)
	}
	if leaf.SerialNumber == nil || leaf.SerialNumber.Sign() < 0 {
		return Identity{}, errors.New("client certificate has no valid serial number; run dlogin for a new certificate")
	}
	return Identity{
		DeviceID: id,
		User:     user,
		Device:   device,
		Serial:   leaf.SerialNumber.Text(16),
		NotAfter: leaf.NotAfter,
	}, nil
}

func hasClientAuth(c *x509.Certificate) bool {
	for _, u := range c.ExtKeyUsage {
		if u == x509.ExtKeyUsageClientAuth {
			return true
		}
	}
	return false
}
