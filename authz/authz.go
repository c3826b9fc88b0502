package authz

import (
	"cmp"
	"context"
	"errors"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Actions a Request can carry. The policy sees them as input.action.
const (
	ActionDial         = "dial"
	ActionDialUDP      = "dial_udp"
	ActionListen       = "listen"
	ActionExposePublic = "expose_public"
	// ActionExposeHTTP is a reverse tunnel of draft-kazuho-httpbis-reverse-tunnel
	// that serves HTTP for a reverse name (`tp expose --http`, proxy/revtunnel.go).
	ActionExposeHTTP = "expose_http"
	// ActionIP is a CONNECT-IP tunnel (RFC 9484, proxy/connectip.go): an allowed
	// decision carries the IP grant (Decision.IP) the tunnel is held to.
	ActionIP = "ip"
)

// Identity is who is behind a verified client certificate.
type Identity struct {
	// DeviceID is the certificate's permanentIdentifier, "user@device".
	DeviceID string
	User     string
	Device   string
	// Groups come from tpd's user store, not from the certificate.
	Groups []string
	// Serial is the certificate serial number in lower-case hex.
	Serial   string
	NotAfter time.Time
	// Guest is the reverse name label a guest device may connect to
	// (authz.Scope guest:LABEL), and GuestOf the user who shared it with
	// the guest, both from tpd's user store; "" for any other device.
	Guest, GuestOf string
}

// String renders the identity the way people read it: "alice@laptop".
func (id Identity) String() string { return id.DeviceID }

// Destination is what a request wants to reach.
type Destination struct {
	Host    string // as asked, canonicalised
	Port    int
	Network string // "tcp" or "udp"
	// IPs are every address Host resolved to; the proxy dials only these.
	IPs []netip.Addr
	// Reverse is the reverse name (the label before the reverse zone) when Host is
	// a reverse listener: for "listen", and for "dial" of a registered name.
	Reverse string
}

// Source is where a request came from.
type Source struct {
	Address   string // remote address of the client connection, host:port
	Transport string // "tls" or "quic"
}

// Request is one authorization question.
type Request struct {
	Action      string
	Identity    Identity
	Destination Destination
	Source      Source
	Time        time.Time
}

// Decision is the policy's answer. Reason is written for a person.
type Decision struct {
	Allow  bool
	Reason string
	// Revision names the policy that decided; empty when TP decided without
	// asking it (deny list, expired certificate). The audit trail records it.
	Revision string
	// IP is what an allowed "ip" request may use (the policy's document ip);
	// nil for other actions.
	IP *IPGrant
	// Cached says that the policy's decision cache answered: no evaluation
	// ran (docs/POLICY.md, "Decision cache").
	Cached bool
}

// IPGrant is what a device may do through a CONNECT-IP tunnel: the prefixes and
// protocols it may reach, and the addresses it gets (none: from the server's
// pool). TP enforces it on every packet.
type IPGrant struct {
	Routes    []IPRoute
	Addresses []netip.Prefix
}

// IPRoute allows packets to Prefix with IP protocol Protocol (0: any).
type IPRoute struct {
	Prefix   netip.Prefix
	Protocol uint8
}

// Authorizer decides requests. An error means "deny": callers fail closed.
type Authorizer interface {
	Authorize(ctx context.Context, req Request) (Decision, error)
}

// Prechecker is implemented by an Authorizer that can tell, before a
// destination's name is resolved, that no addresses it could resolve to would
// make the request allowed (req.Destination.IPs is ignored). The proxy then
// refuses without a lookup, so a device cannot make it query names of its
// choosing. An error means "deny", as for Authorize.
type Prechecker interface {
	MayAllow(ctx context.Context, req Request) (bool, error)
}

// ErrPolicyDenied is wrapped by errors that report a policy denial.
var ErrPolicyDenied = errors.New("denied by policy")

// Asked says what r asks, for a person, in words that follow "allows alice@laptop
// to": "dial db.internal:5432", "listen as game.rev.tp.internal", "expose game on
// public TCP port 20005", "expose blog by TLS server name blog.example.org",
// "serve wiki.rev.tp.internal over HTTP". A public exposure without a port says
// "a public port": a port nobody asked for is not shown as port 0.
func (r Request) Asked() string {
	d := r.Destination
	switch r.Action {
	case ActionListen:
		return "listen as " + d.Host
	case ActionExposePublic:
		what := "expose " + cmp.Or(d.Reverse, "a service")
		switch {
		case d.Host != "":
			return what + " by TLS server name " + d.Host
		case d.Port != 0 && d.Reverse == "": // a listen-tcp tunnel (proxy/revtunnel.go)
			return "open public " + strings.ToUpper(cmp.Or(d.Network, "tcp")) + " port " + strconv.Itoa(d.Port)
		case d.Port != 0:
			return what + " on public " + strings.ToUpper(cmp.Or(d.Network, "tcp")) + " port " + strconv.Itoa(d.Port)
		}
		return what + " on a public port"
	case ActionExposeHTTP:
		return "serve " + d.Host + " over HTTP"
	case ActionIP:
		return "open an IP tunnel"
	}
	return r.Action + " " + hostPort(d)
}
