package wire

import (
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
)

// Reverse-listener operations (docs/PROTOCOL.md, section 11).
const (
	// OpListen registers reverse names on a control stream (QUIC) or control
	// connection (TLS), which then stays open for as long as the names are served.
	OpListen = "listen"
	// OpAccept pairs a new TLS connection with a session announced on the control
	// connection; after the ok it carries that session's bytes.
	OpAccept = "accept"
)

// Refusal codes of reverse listeners.
const (
	// CodeNameTaken: another identity holds the name (online, or offline within
	// its grace period).
	CodeNameTaken = "name_taken"
	// CodeReverseUnknown: no agent has registered the reverse name dialed.
	CodeReverseUnknown = "reverse_unknown"
	// CodeReverseOffline: the name's agent is reconnecting (grace period).
	CodeReverseOffline = "reverse_offline"
	// CodeReverseTimeout: the agent did not pick up the session in time.
	CodeReverseTimeout = "reverse_timeout"
	// CodeReverseBusy: the agent has too many sessions waiting to be picked up.
	CodeReverseBusy = "reverse_busy"
	// CodeUnknownSession: an accept named a session that is not waiting for this device.
	CodeUnknownSession = "unknown_session"
	// CodeReverseDisabled: the server has no reverse zone.
	CodeReverseDisabled = "reverse_disabled"
)

// MaxListenNames bounds the names one listen hello may register.
const MaxListenNames = 16

// MaxSessionIDLen bounds an accept's session id.
const MaxSessionIDLen = 64

// SessionHeader is a frame the server sends to an agent: at the start of every
// stream it opens to the agent (QUIC), or on the control connection (TLS) to
// announce a session (Session set), keep the connection alive (Ping) or say why
// it ends (End, Reason).
type SessionHeader struct {
	V       int    `json:"v"`
	Session string `json:"session,omitempty"`
	// Name is the reverse name dialed, without the zone.
	Name string `json:"name,omitempty"`
	// Peer* describe the dialer as the server authenticated it. A protected agent
	// checks PeerID against the dialer's own certificate; groups come from here.
	PeerID     string   `json:"peer_id,omitempty"`
	PeerUser   string   `json:"peer_user,omitempty"`
	PeerGroups []string `json:"peer_groups,omitempty"`
	// PeerGuestOf says the dialer is a guest with whom this user shared Name
	// (docs/LOGIN.md, "Guest shares"): its device may connect to Name and
	// nothing else, until the share ends. An agent of that user's admits it
	// as if its allow list named it, unless it refuses guests.
	PeerGuestOf string `json:"peer_guest_of,omitempty"`
	// Public is set on a session that came from a public port or SNI
	// pass-through ("tcp/27015", "sni/blog.example.org"): there is no dialer
	// identity, PeerAddr is the public client's address, and no inner TLS is run.
	Public   string `json:"public,omitempty"`
	PeerAddr string `json:"peer_addr,omitempty"`
	// Net is "udp" for a session of a name whose service is UDP: the stream then
	// carries datagrams (capsules, udpwire.go) instead of a byte stream. Flow is
	// set on a public UDP session over QUIC whose datagrams also travel in
	// DATAGRAM frames, with this flow id (the stream's quarter stream ID).
	Net  string  `json:"net,omitempty"`
	Flow *uint64 `json:"flow,omitempty"`
	Ping bool    `json:"ping,omitempty"`
	// PingMS, on a ping, is the server's period between pings in
	// milliseconds: an agent that hears nothing for twice that plus a second
	// takes the control connection as lost.
	PingMS int64  `json:"ping_ms,omitempty"`
	End    string `json:"end,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// WriteSessionHeader writes h as one frame.
func WriteSessionHeader(w io.Writer, h SessionHeader) error { return writeFrame(w, h) }

// ReadSessionHeader reads one session header frame.
func ReadSessionHeader(r io.Reader) (SessionHeader, error) {
	body, err := readFrame(r)
	if err != nil {
		return SessionHeader{}, err
	}
	var h SessionHeader
	if err := strictJSON(body, &h); err != nil {
		return SessionHeader{}, Errorf(CodeBadRequest, "malformed session header: %v", err)
	}
	if h.V != Version {
		return SessionHeader{}, Errorf(CodeUnsupportedVersion, "session header version %d; this side speaks %d", h.V, Version)
	}
	return h, nil
}

// ValidReverseName reports whether name is usable as a reverse name: one DNS
// label of lower-case letters, digits and inner hyphens, 1 to 63 characters.
func ValidReverseName(name string) error {
	if name == "" || len(name) > 63 {
		return fmt.Errorf("reverse name %q must be 1 to 63 characters", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c == '.' {
			label, _, _ := strings.Cut(name, ".")
			return fmt.Errorf("reverse name %q must be one label, without the reverse zone: e.g. %q for %s", name, label, name)
		}
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return fmt.Errorf("reverse name %q may only contain a-z, 0-9 and '-'", name)
		}
	}
	if strings.HasPrefix(name, "-") || strings.HasSuffix(name, "-") {
		return fmt.Errorf("reverse name %q must not start or end with '-'", name)
	}
	return nil
}

func (h ClientHello) validateReverse() error {
	if h.Host != "" || h.Port != 0 {
		return Errorf(CodeBadRequest, "op %q takes no host or port", h.Op)
	}
	switch h.Op {
	case OpListen:
		if h.Net != "tcp" {
			return Errorf(CodeUnsupportedNetwork, "network %q is not supported for reverse listeners; expected \"tcp\"", h.Net)
		}
		if h.Session != "" {
			return Errorf(CodeBadRequest, "op \"listen\" takes no session")
		}
		if len(h.Names) == 0 || len(h.Names) > MaxListenNames {
			return Errorf(CodeBadRequest, "op \"listen\" needs 1 to %d names, not %d", MaxListenNames, len(h.Names))
		}
		seen := make(map[string]bool, len(h.Names))
		for _, n := range h.Names {
			if err := ValidReverseName(n); err != nil {
				return Errorf(CodeBadRequest, "%v", err)
			}
			if seen[n] {
				return Errorf(CodeBadRequest, "reverse name %q is listed twice", n)
			}
			seen[n] = true
		}
		udp := make(map[string]bool, len(h.UDP))
		for _, n := range h.UDP {
			if !seen[n] {
				return Errorf(CodeBadRequest, "udp lists %q, which is not among the names registered", n)
			}
			if udp[n] {
				return Errorf(CodeBadRequest, "udp lists %q twice", n)
			}
			udp[n] = true
		}
		if err := validatePublic(h.Public, seen, udp); err != nil {
			return err
		}
	case OpAccept:
		if h.Net != "" || len(h.Names) > 0 || h.Public != nil || h.UDP != nil {
			return Errorf(CodeBadRequest, "op \"accept\" takes only a session")
		}
		return validSessionID(h.Session)
	}
	return nil
}

// validSessionID accepts 1 to MaxSessionIDLen lower-case hexadecimal characters.
func validSessionID(id string) error {
	if id == "" || len(id) > MaxSessionIDLen {
		return Errorf(CodeBadRequest, "session id must be 1 to %d characters", MaxSessionIDLen)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; !('a' <= c && c <= 'f' || '0' <= c && c <= '9') {
			return Errorf(CodeBadRequest, "session id must be lower-case hexadecimal")
		}
	}
	return nil
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

// UnmarshalJSON decodes strictly, like the rest of the hello (strictJSON); an
// element of a slice is decoded through it.
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
