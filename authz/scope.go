package authz

import (
	"fmt"
	"net/url"
	"strings"
)

// Scope narrows what a device may do, before the policy is asked: a device
// with a scope is refused every request outside it, whatever the policy
// says, and what is inside it still needs the policy's allow. The empty
// scope is none: the device may do what the policy allows.
//
//	expose:LABEL         keep an agent registered for the reverse name LABEL
//	                     (listen: end to end, to the devices the agent allows):
//	                     nothing else, no dial
//	expose-public:LABEL  that, and publish LABEL to anyone: on public ports,
//	                     TLS server names and as an HTTP app (reverse tunnels)
//	guest:LABEL          dial the reverse name LABEL (TCP or UDP), and nothing
//	                     else: an outside person's device, given that one name
//	                     by a share of someone who may keep it exposed
//	dial:LABEL           dial the reverse name LABEL (TCP or UDP), and nothing
//	                     else: a credential a person gives an application of
//	                     their own, a browser above all (TP.js)
//	dial:*               dial what the policy lets the person dial (TCP or
//	                     UDP): no listen, exposure or IP tunnel
//	dial:LABEL@ORIGIN    either of those, for the pages of one web origin
//	dial:*@ORIGIN        (https://HOST[:PORT]) only: a browser's credential
//	                     gets its certificate only from a page of that origin
//
// A credential for an application that should not hold a person's identity
// (a CI job's agent, a service that publishes itself) is a device with a
// scope: it can keep its one name up and do nothing else.
type Scope string

// Scope kinds.
const (
	scopeExpose       = "expose"
	scopeExposePublic = "expose-public"
	scopeGuest        = "guest"
	scopeDial         = "dial"
	// AnyDestination is the label of dial:*.
	AnyDestination = "*"
)

// ParseScope checks s, a scope as written above ("" for none).
func ParseScope(s string) (Scope, error) {
	if s == "" {
		return "", nil
	}
	kind, label, ok := strings.Cut(s, ":")
	if !ok || (kind != scopeExpose && kind != scopeExposePublic && kind != scopeGuest && kind != scopeDial) {
		return "", fmt.Errorf("scope %q: want expose:LABEL, expose-public:LABEL, dial:LABEL or dial:* (guest:LABEL comes only from a share)", s)
	}
	if kind == scopeDial {
		name, origin, hasOrigin := strings.Cut(label, "@")
		if hasOrigin && !ValidOrigin(origin) {
			return "", fmt.Errorf("scope %q: %q is not a web origin (https://HOST[:PORT], lower case)", s, origin)
		}
		if name == AnyDestination {
			return Scope(s), nil
		}
		label = name
	}
	if !ValidLabel(label) {
		return "", fmt.Errorf("scope %q: %q is not a reverse name's label (1 to 63 lower-case letters, digits or '-', not starting or ending with '-')", s, label)
	}
	return Scope(s), nil
}

// Label is the reverse name label the scope is about ("" for none).
func (s Scope) Label() string {
	_, label, _ := strings.Cut(string(s), ":")
	label, _, _ = strings.Cut(label, "@")
	return label
}

// Origin is the web origin a dial scope is bound to (dial:NAME@ORIGIN), ""
// for none.
func (s Scope) Origin() string {
	kind, label, _ := strings.Cut(string(s), ":")
	if kind != scopeDial {
		return ""
	}
	_, origin, _ := strings.Cut(label, "@")
	return origin
}

// ValidOrigin reports whether o is a web origin a scope may name:
// https://HOST[:PORT], lower case, at most 255 bytes, nothing after the host
// and port.
func ValidOrigin(o string) bool {
	if len(o) > 255 || o != strings.ToLower(o) {
		return false
	}
	u, err := url.Parse(o)
	return err == nil && u.Scheme == "https" && u.Host != "" && u.Path == "" && u.RawQuery == "" &&
		u.Fragment == "" && u.User == nil && u.Opaque == "" && "https://"+u.Host == o
}

// Describe says what a device with the scope may do, for its holder
// ("may only keep ci exposed, to the devices its agent allows").
func (s Scope) Describe() string {
	kind, label, _ := strings.Cut(string(s), ":")
	switch _, err := ParseScope(string(s)); {
	case s == "":
		return "may do what the policy allows"
	case err != nil:
		return "a scope TP does not know: this device may do nothing"
	case kind == scopeExposePublic:
		return "may only keep " + label + " exposed, to devices or publicly, and do nothing else"
	case kind == scopeGuest:
		return "a guest: may only connect to " + label + ", while the share that gave it lasts"
	case kind == scopeDial:
		name, origin, _ := strings.Cut(label, "@")
		from := ""
		if origin != "" {
			from = ", from pages of " + origin
		}
		if name == AnyDestination {
			return "may only connect to what the policy allows its person" + from + ", and do nothing else"
		}
		return "may only connect to " + name + from + ", and do nothing else"
	}
	return "may only keep " + label + " exposed to the devices its agent allows, and do nothing else"
}

// Allows says whether req is inside the scope, and when it is not, why, in a
// sentence for the person who holds the device. An unknown scope (one that
// ParseScope refuses) allows nothing.
func (s Scope) Allows(req Request) (bool, string) {
	if s == "" {
		return true, ""
	}
	kind, label, _ := strings.Cut(string(s), ":")
	if _, err := ParseScope(string(s)); err != nil {
		return false, fmt.Sprintf("%s holds a credential whose scope %q TP does not know, so it may do nothing; enrol it again", req.Identity, string(s))
	}
	if kind == scopeGuest {
		if (req.Action == ActionDial || req.Action == ActionDialUDP) && req.Destination.Reverse == label {
			return true, ""
		}
		return false, fmt.Sprintf("%s is a guest that may only connect to %s (scope %s), not %s", req.Identity, label, string(s), req.Asked())
	}
	if kind == scopeDial {
		label, _, _ = strings.Cut(label, "@")
		dial := req.Action == ActionDial || req.Action == ActionDialUDP
		switch {
		case dial && label == AnyDestination:
			return true, ""
		case dial && req.Destination.Reverse == label:
			return true, ""
		case label == AnyDestination:
			return false, fmt.Sprintf("%s holds a credential that may only connect (scope %s), not %s", req.Identity, string(s), req.Asked())
		}
		return false, fmt.Sprintf("%s holds a credential that may only connect to %s (scope %s), not %s", req.Identity, label, string(s), req.Asked())
	}
	out := fmt.Sprintf("%s holds a credential that may only keep %s exposed (scope %s), not %s", req.Identity, label, string(s), req.Asked())
	switch req.Action {
	case ActionListen:
		if req.Destination.Reverse == label {
			return true, ""
		}
	case ActionExposePublic, ActionExposeHTTP: // an HTTP app may be open to anyone
		if req.Destination.Reverse == label && kind == scopeExposePublic {
			return true, ""
		}
		if req.Destination.Reverse == label {
			return false, fmt.Sprintf("%s holds a credential that may keep %s exposed to devices only (scope %s), not publicly", req.Identity, label, string(s))
		}
	}
	return false, out
}

// Guest is the reverse name label a guest scope (guest:LABEL) gives, "" for
// any other scope.
func (s Scope) Guest() string {
	kind, label, _ := strings.Cut(string(s), ":")
	if kind != scopeGuest || !ValidLabel(label) {
		return ""
	}
	return label
}

// GuestScope is the scope of a guest given label by a share.
func GuestScope(label string) (Scope, error) { return ParseScope(scopeGuest + ":" + label) }

// Scoper is implemented by a Directory that knows devices' scopes.
type Scoper interface {
	// Scope is the device's scope, "" when it has none (or is unknown: the
	// directory's Lookup refuses an unknown device anyway).
	Scope(deviceID string) Scope
}

// Granter is implemented by a Directory that knows which device approved a
// granted one (a credential a person gave an application): a grant lives as
// long as its approver, so Verify refuses it once the approver is on the deny
// list (the directory's Lookup refuses it once the approver is revoked there).
type Granter interface {
	// GrantedBy is the approving device's ID, "" for a device not granted.
	GrantedBy(deviceID string) string
}

// Sharer is implemented by a Directory that knows guests' shares.
type Sharer interface {
	// SharedBy is the user who shared its name with the guest device, ""
	// for a device that is no guest's (or whose share is gone).
	SharedBy(deviceID string) string
}

// ValidLabel reports whether l is one lower-case DNS label, as reverse names'
// labels are.
func ValidLabel(l string) bool {
	if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
		return false
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}
