package policy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// DefaultFile is the name WriteDefault gives the default policy.
const DefaultFile = "tp.rego"

// DefaultPolicy is the policy tpd writes on first start. It allows nothing and tells
// the person who asked what was refused; its comments show how to allow things.
const DefaultPolicy = `# TP authorization policy.
#
# tpd loads every *.rego file in this directory (files ending in _test.rego are
# Rego unit tests, run by "tpd policy test"); each must declare "package tp.authz".
# A request is allowed when data.tp.authz.allow is true and the set
# data.tp.authz.deny is empty: a deny rule wins over every allow rule. allow must
# be true or false; anything else, an evaluation error or a timeout denies the
# request. data.tp.authz.reason is shown to the person whose request was denied.
# Policies decide on the input below alone; http.send and net.lookup_ip_addr are
# not available.
#
# Check a change before it goes live with "tpd policy test" and
# "tpd policy eval --user alice --device laptop --dest db.internal:5432";
# tpd reloads this directory when it changes and keeps the previous policy if the
# new one does not compile. docs/POLICY.md describes all of this in detail.
#
# The input each request is decided on:
#   input.action                  "dial", "dial_udp", "listen", "expose_public" or "expose_http"
#   input.identity.user           "alice"
#   input.identity.device         "laptop"
#   input.identity.device_id      "alice@laptop"
#   input.identity.groups         ["dba", "ops"]  (from tpd's user store; may be [])
#   input.identity.serial         certificate serial, lower-case hex
#   input.identity.expiry         certificate expiry, RFC 3339
#   input.identity.guest          "laptop-ssh": only for a guest, the name its
#   share gives (absent for everyone else)
#   input.destination.host        "db.internal" (lower case, no trailing dot; an
#   IP literal in any spelling is given in standard form: "127.1" is "127.0.0.1")
#   input.destination.port        5432
#   input.destination.network     "tcp" or "udp"
#   input.destination.ips         ["10.0.0.5"]  (the only addresses TP will dial;
#   [] when the name does not resolve: TP asks anyway and refuses with
#   resolve_failed only a request the policy allows)
#   input.destination.embedded_ipv4  ["10.0.0.5"] (the IPv4 addresses inside the
#   SIIT, NAT64, 6to4, Teredo and IPv4-compatible addresses of ips)
#   input.source.address          "203.0.113.7:51234"
#   input.source.transport        "tls" or "quic"
#   input.time                    RFC 3339 with nanoseconds, UTC
package tp.authz

# Nothing is allowed unless a rule below says so (and the only rule below that
# is not an example lets guests reach the one name shared with them).
default allow := false

# ---------------------------------------------------------------------------
# Internal addresses. A request is refused when any address the destination
# resolved to (or the IPv4 address inside an IPv6 address that carries one) is
# internal: loopback, private, link-local (which includes cloud metadata at
# 169.254.169.254), CGNAT (100.64.0.0/10, which includes 100.100.100.200),
# unique-local IPv6 (fd00:ec2::254), unspecified, multicast or reserved - unless
# a network in allowed_internal covers it. IPv6 forms that carry an IPv4 address
# and are no ordinary destination - SIIT (::ffff:0:0:0/96), IPv4-compatible
# (::/96), NAT64's local-use prefix and Teredo - are internal as a whole; NAT64's
# well-known prefix and 6to4 are judged by the IPv4 address inside. This is a
# deny rule, so no allow rule in any file can undo it; only allowed_internal
# can. TP never dials its own listeners, whatever the policy says.
#
# Its message is shown only to a request that an allow rule matches: anyone else
# is told that no rule allows the request, whatever the name resolves to, so a
# device cannot learn which names exist or where they point (see "Reasons").
# ---------------------------------------------------------------------------

deny contains msg if {
	some ip in internal_addresses
	not internal_allowed(ip)
	msg := internal_message
}

internal_message := sprintf("%s an internal address that this policy does not open; ask the TP administrator to add its network to allowed_internal", [internal_subject])

internal_subject := sprintf("%s is", [input.destination.host]) if {
	input.destination.host in input.destination.ips
} else := sprintf("%s resolves to", [input.destination.host])

# Internal networks that allowed requests may reach. Empty: add the networks
# your services live in, for everyone or only for some requests:
#
# allowed_internal contains "10.0.0.0/24"
#
# allowed_internal contains "10.9.0.7/32" if "dba" in input.identity.groups
allowed_internal contains cidr if {
	some cidr in []
}

internal_networks := [
	"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
	"172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15",
	"224.0.0.0/4", "240.0.0.0/4",
	"::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/32",
	"fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
]

# destination_addresses are the resolved addresses and the IPv4 addresses inside them.
destination_addresses contains ip if some ip in input.destination.ips

destination_addresses contains ip if some ip in input.destination.embedded_ipv4

# internal_addresses are the destination's addresses in internal_networks (one
# builtin call for all of them: this runs on every request).
internal_addresses contains ip if {
	some match in net.cidr_contains_matches(internal_networks, destination_addresses)
	ip := match[1]
}

# is_internal(ip) is true for an address in internal_networks; use it in your rules.
is_internal(ip) if count(net.cidr_contains_matches(internal_networks, ip)) > 0

internal_allowed(ip) if {
	some cidr in allowed_internal
	net.cidr_contains(cidr, ip)
}

# Any resolved address of the destination is internal.
internal_destination if count(internal_addresses) > 0

# ---------------------------------------------------------------------------
# Guests. A person who may keep a reverse name exposed can share it, for a
# limited time, with an outside person the identity provider vouches for
# (tp share; docs/LOGIN.md, "Guest shares"). The guest's device may connect to
# that one name and nothing else, whatever the rules say (its scope is checked
# before the policy); this rule lets it do that. Remove it to refuse guests.
# ---------------------------------------------------------------------------

allow if {
	input.action in {"dial", "dial_udp"}
	input.destination.reverse == input.identity.guest
}

# ---------------------------------------------------------------------------
# Examples. Remove the leading "# " to use one.
# ---------------------------------------------------------------------------

# Members of group "dba" may reach PostgreSQL on db.internal (which lives in
# 10.0.0.0/24, opened by the allowed_internal example above):
#
# allow if {
#     input.action == "dial"
#     input.destination.host == "db.internal"
#     input.destination.port == 5432
#     "dba" in input.identity.groups
# }

# User alice (on any of her devices) may ssh to build.internal:
#
# allow if {
#     input.action == "dial"
#     input.identity.user == "alice"
#     input.destination.host == "build.internal"
#     input.destination.port == 22
# }

# Group "ops" may resolve names with the internal DNS server over UDP:
#
# allow if {
#     input.action == "dial_udp"
#     input.destination.host == "dns.internal"
#     input.destination.port == 53
#     "ops" in input.identity.groups
# }

# Everyone may reach HTTPS on the public internet (internal addresses stay
# refused by the deny rule above):
#
# allow if {
#     input.action == "dial"
#     input.destination.port == 443
# }

# Devices of alice may expose a service through a reverse listener:
#
# allow if {
#     input.action == "listen"
#     input.identity.user == "alice"
# }

# ... and serve an HTTP app by name through a reverse tunnel (tp expose --http,
# or any client of draft-kazuho-httpbis-reverse-tunnel), the same way:
#
# allow if {
#     input.action == "expose_http"
#     input.identity.user == "alice"
# }

# ---------------------------------------------------------------------------
# Reasons. A denied person sees the reason; make it say what to do. An allowed
# request has no reason. Rules that set reason directly would conflict with the
# rule below (an evaluation error, so a denial with a generic message); add to
# deny_reason instead (or to deny, which also denies). A request that no allow
# rule matches is not shown the internal-address message: keep your own reasons
# for such requests free of what the destination resolved to, so that they tell
# a device nothing about names it may not reach.
#
# Add your own by adding to deny_reason, for example:
#
# deny_reason contains "ssh to production needs the ops group; ask #infra" if {
#     input.destination.port == 22
#     endswith(input.destination.host, ".prod.internal")
#     not "ops" in input.identity.groups
# }
# ---------------------------------------------------------------------------

denied if not allow

denied if count(deny) > 0

# shown_denials are the deny messages the person is shown.
shown_denials contains msg if {
	some msg in deny
	allow
}

shown_denials contains msg if {
	some msg in deny
	not allow
	msg != internal_message
}

shown_denials contains msg if some msg in deny_reason

reason := concat("; ", sort(shown_denials)) if {
	denied
	count(shown_denials) > 0
} else := msg if {
	denied
	msg := sprintf("no policy rule allows %s to %s", [input.identity.device_id, request_words])
} else := "no policy rule allows this request" if {
	denied
}

# request_words says what the request asks, in the words of a reason: "dial db.internal
# port 5432", "listen as game.rev.tp.internal", "expose game on public TCP port
# 20005", "expose blog by TLS server name blog.example.org".
request_words := msg if {
	input.action == "listen"
	msg := sprintf("listen as %s", [input.destination.host])
} else := msg if {
	input.action == "expose_public"
	input.destination.host != ""
	msg := sprintf("expose %s by TLS server name %s", [object.get(input.destination, "reverse", "a service"), input.destination.host])
} else := msg if {
	input.action == "expose_public"
	input.destination.port != 0
	input.destination.reverse
	msg := sprintf("expose %s on public %s port %v", [input.destination.reverse, upper(input.destination.network), input.destination.port])
} else := msg if {
	input.action == "expose_public"
	input.destination.port != 0
	msg := sprintf("open public %s port %v", [upper(input.destination.network), input.destination.port])
} else := msg if {
	input.action == "expose_public"
	msg := sprintf("expose %s on a public port", [object.get(input.destination, "reverse", "a service")])
} else := msg if {
	input.action == "expose_http"
	msg := sprintf("serve %s over HTTP", [input.destination.host])
} else := "open an IP tunnel" if {
	input.action == "ip"
} else := msg if {
	msg := sprintf("%s %s port %v", [input.action, input.destination.host, input.destination.port])
}

# deny_reason collects explanations for a denial. This rule is never true; it is
# here so that the set exists even when no other rule adds to it.
deny_reason contains msg if {
	msg := "never shown"
	false
}
`

// WriteDefault creates dir (0700) and writes [DefaultPolicy] to dir/tp.rego (0600),
// unless dir already holds a .rego file: an operator's policy is never overwritten.
func WriteDefault(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create policy directory: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read policy directory: %w", err)
	}
	for _, de := range entries {
		if strings.HasSuffix(de.Name(), ".rego") {
			return nil
		}
	}
	path := filepath.Join(dir, DefaultFile)
	// O_EXCL: if someone writes the file between ReadDir and here, theirs wins.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("write default policy: %w", err)
	}
	if _, err := f.WriteString(DefaultPolicy); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("write default policy: %w", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return fmt.Errorf("write default policy: %w", err)
	}
	return nil
}
