package wire

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/quic-go/quic-go"
)

// Stream is one request's byte stream: a TLS connection (TLS transport) or a QUIC
// stream (QUIC transport). CloseWrite half-closes the sending direction.
type Stream interface {
	net.Conn
	CloseWrite() error
}

var _ Stream = (*tls.Conn)(nil)

// HelloWriteTimeout bounds writing a hello or a report to a peer that does not read.
const HelloWriteTimeout = 5 * time.Second

// RevokedError ends a live session that a re-check no longer allows. Its text is
// what the session's log line gives as the reason it ended. Identity is true when
// the identity itself is no longer accepted (revoked, unenrolled), false when the
// policy no longer allows the session.
type RevokedError struct {
	Reason   string
	Identity bool
}

func (e *RevokedError) Error() string { return "no longer authorised: " + e.Reason }

// Code is the QUIC application error code an abort for e carries.
func (e *RevokedError) Code() quic.ApplicationErrorCode {
	if e.Identity {
		return QUICRevoked
	}
	return QUICPolicyChanged
}

// UnwrapOpError drops net.OpError's repetition of the address for a shorter reason.
func UnwrapOpError(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err
	}
	return err
}

// CodePublicRefused: the server does not open this public port or server name
// (outside the administrator's public-ports, one of the server's own names, a
// website, or a name under the reverse zone), or could not open the port.
const CodePublicRefused = "public_refused"

// PublicSpec is one public exposure in a listen hello: Name (one of the hello's
// names) on TCP port Port of the server, or by TLS server name SNI on the
// server's shared port. Exactly one of Port and SNI is set.
type PublicSpec struct {
	Name string `json:"name"`
	Net  string `json:"net"`
	Port int    `json:"port,omitempty"`
	SNI  string `json:"sni,omitempty"`
}

// UnmarshalJSON decodes strictly, like the rest of the hello: no unknown fields.
func (p *PublicSpec) UnmarshalJSON(b []byte) error {
	type plain PublicSpec
	var v plain
	if err := strictJSON(b, &v); err != nil {
		return err
	}
	*p = PublicSpec(v)
	return nil
}

// Key is the registry key the exposure is held under: "tcp/27015", "sni/NAME".
func (p PublicSpec) Key() string {
	if p.SNI != "" {
		return "sni/" + p.SNI
	}
	return p.Net + "/" + strconv.Itoa(p.Port)
}

// netOf is the network of a name in a listen hello: "udp" if listed in udp.
func netOf(name string, udp map[string]bool) string {
	if udp[name] {
		return "udp"
	}
	return "tcp"
}

func validatePublic(specs []PublicSpec, names, udp map[string]bool) error {
	if len(specs) > MaxListenNames {
		return Errorf(CodeBadRequest, "op \"listen\" takes at most %d public exposures, not %d", MaxListenNames, len(specs))
	}
	seen := make(map[string]bool, len(specs))
	for _, p := range specs {
		if !names[p.Name] {
			return Errorf(CodeBadRequest, "public exposure of %q: the name is not among the names registered", p.Name)
		}
		if want := netOf(p.Name, udp); p.Net != want {
			return Errorf(CodeBadRequest, "public exposure of %q: network %q, but %q is a %s service", p.Name, p.Net, p.Name, strings.ToUpper(want))
		}
		if p.Net == "udp" && p.SNI != "" {
			return Errorf(CodeUnsupportedNetwork, "public exposure of %q: a UDP service is exposed on a public port, not by TLS server name", p.Name)
		}
		switch {
		case p.SNI != "" && p.Port != 0, p.SNI == "" && p.Port == 0:
			return Errorf(CodeBadRequest, "public exposure of %q needs exactly one of port and sni", p.Name)
		case p.Port < 0 || p.Port > 65535:
			return Errorf(CodeBadRequest, "public port %d is out of range 1..65535", p.Port)
		case p.SNI != "":
			if err := ValidServerName(p.SNI); err != nil {
				return Errorf(CodeBadRequest, "%v", err)
			}
		}
		if seen[p.Key()] {
			return Errorf(CodeBadRequest, "public exposure %s is listed twice", p.Key())
		}
		seen[p.Key()] = true
	}
	return nil
}

// ValidServerName reports whether name can be a public pass-through name: a
// lower-case DNS name of at least two labels (no IP address, no trailing dot).
func ValidServerName(name string) error {
	if len(name) > MaxHostLen {
		return fmt.Errorf("server name %q is longer than %d bytes", name, MaxHostLen)
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return fmt.Errorf("server name %q is an IP address; TLS clients send no SNI for addresses", name)
	}
	labels := strings.Split(name, ".")
	if len(labels) < 2 {
		return fmt.Errorf("server name %q must have at least two labels (e.g. blog.example.org)", name)
	}
	for _, l := range labels {
		if err := ValidReverseName(l); err != nil {
			return fmt.Errorf("server name %q: label %q must be 1 to 63 characters of a-z, 0-9 and inner '-'", name, l)
		}
	}
	return nil
}
