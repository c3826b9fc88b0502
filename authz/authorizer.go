package authz

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"time"
)

// Directory answers which groups a device's user has, and whether the device may
// connect at all.
type Directory interface {
	// Lookup returns the groups of the device's user. It returns an error wrapping
	// ErrUnknownDevice or ErrRevoked when the device may not connect.
	Lookup(deviceID string) (groups []string, err error)
}

// Sentinels for errors.Is. Their texts are short because they end longer sentences:
// "device alice@laptop is not enrolled: unknown device".
var (
	// ErrUnknownDevice is wrapped by errors about devices TP has not enrolled.
	ErrUnknownDevice = errors.New("unknown device")
	// ErrRevoked is wrapped by errors about revoked users, devices and certificates.
	ErrRevoked = errors.New("revoked")
)

// revokedError carries a deny-list reason, written for a person, and matches ErrRevoked.
type revokedError struct{ reason string }

func (e *revokedError) Error() string        { return e.reason }
func (e *revokedError) Is(target error) bool { return target == ErrRevoked }

// Verify turns a client certificate whose chain is already verified into a full
// Identity: the device identity from the certificate (see [IdentityFromCert]),
// checked against deny (nil: nothing is deny-listed), plus the user's groups
// from dir. It is
// meant for tls.Config.VerifyConnection and for re-checking live sessions. Errors
// are written for the person holding the certificate; those about revoked or
// unknown devices wrap ErrRevoked or ErrUnknownDevice.
func Verify(leaf *x509.Certificate, deny *DenyList, dir Directory) (Identity, error) {
	id, err := IdentityFromCert(leaf)
	if err != nil {
		return Identity{}, err
	}
	if reason, denied := deny.Denies(id); denied {
		return Identity{}, &revokedError{reason}
	}
	if sc, ok := dir.(Scoper); ok {
		id.Guest = sc.Scope(id.DeviceID).Guest()
	}
	if sh, ok := dir.(Sharer); ok && id.Guest != "" {
		id.GuestOf = sh.SharedBy(id.DeviceID)
	}
	if id.GuestOf == "" {
		id.Guest = "" // a guest whose sharer is unknown is no guest of anyone's
	}
	if g, ok := dir.(Granter); ok {
		if reason, denied := deny.DeniesApprover(id, g.GrantedBy(id.DeviceID)); denied {
			return Identity{}, &revokedError{reason}
		}
	}
	if dir == nil {
		return Identity{}, fmt.Errorf("no device directory is configured, so %s cannot be checked; the connection was refused", id)
	}
	groups, err := dir.Lookup(id.DeviceID)
	if err != nil {
		// The Directory's errors already name the device and say why.
		return Identity{}, fmt.Errorf("connection refused: %w", err)
	}
	// Copy, so the identity never shares memory with the directory, and sort, so
	// the policy input is stable.
	id.Groups = slices.Compact(slices.Sorted(slices.Values(groups)))
	if id.Groups == nil {
		id.Groups = []string{}
	}
	return id, nil
}

func hostPort(d Destination) string {
	return net.JoinHostPort(d.Host, strconv.Itoa(d.Port))
}

// Input builds the policy input document for req. Its field names are a contract
// with policy authors (see the default policy's header) and must not change:
//
//	action                "dial", "dial_udp", "listen" or "expose_public"
//	identity.user         "alice"
//	identity.device       "laptop"
//	identity.device_id    "alice@laptop"
//	identity.groups       array of strings, never null
//	identity.serial       certificate serial, lower-case hex
//	identity.expiry       certificate NotAfter, RFC 3339, UTC
//	identity.guest        for a guest only: the reverse name label its share gives
//	destination.host      as asked
//	destination.port      number
//	destination.network   "tcp" or "udp"
//	destination.ips       array of strings (IPv4-mapped IPv6 as IPv4), never null;
//	                      [] when the name did not resolve (TP asks anyway, so that
//	                      a device the policy refuses learns nothing; nothing is dialed)
//	destination.embedded_ipv4  array of strings, never null: the IPv4 addresses
//	                      inside the SIIT, NAT64, 6to4, Teredo and IPv4-compatible
//	                      addresses of ips (see EmbeddedIPv4), which a policy
//	                      judges them by
//	destination.reverse   the reverse name (label before the reverse zone), only
//	                      for "listen" and for dials of a reverse listener
//	source.address        client address, host:port
//	source.transport      "tls" or "quic"
//	time                  req.Time, RFC 3339 with nanoseconds, UTC
//
// Input renders req as it is; Authorize fills a zero Time with the current time
// first. The values are only strings, numbers, arrays and objects, so the document
// converts to Rego without reflection and marshals to JSON as shown.
func Input(req Request) map[string]any {
	groups := make([]any, len(req.Identity.Groups))
	for i, g := range req.Identity.Groups {
		groups[i] = g
	}
	ips := make([]any, len(req.Destination.IPs))
	embedded := make([]any, 0)
	for i, ip := range req.Destination.IPs {
		// Unmap, so "::ffff:10.0.0.1" meets a policy's 10.0.0.0/8 as 10.0.0.1.
		ips[i] = ip.Unmap().String()
		if v4, ok := EmbeddedIPv4(ip); ok && !ip.Is4In6() { // mapped ones are in ips already
			embedded = append(embedded, v4.String())
		}
	}
	dest := map[string]any{
		"host":          req.Destination.Host,
		"port":          req.Destination.Port,
		"network":       req.Destination.Network,
		"ips":           ips,
		"embedded_ipv4": embedded,
	}
	if req.Destination.Reverse != "" { // only for reverse listeners
		dest["reverse"] = req.Destination.Reverse
	}
	identity := map[string]any{
		"user":      req.Identity.User,
		"device":    req.Identity.Device,
		"device_id": req.Identity.DeviceID,
		"groups":    groups,
		"serial":    req.Identity.Serial,
		"expiry":    req.Identity.NotAfter.UTC().Format(time.RFC3339),
	}
	if req.Identity.Guest != "" { // only for guests
		identity["guest"] = req.Identity.Guest
	}
	return map[string]any{
		"action":      req.Action,
		"identity":    identity,
		"destination": dest,
		"source": map[string]any{
			"address":   req.Source.Address,
			"transport": req.Source.Transport,
		},
		"time": req.Time.UTC().Format(time.RFC3339Nano),
	}
}
