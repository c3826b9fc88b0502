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
# skipped); each must declare "package tp.authz". Each request is decided by
# data.tp.authz.allow, which must be true or false; anything else, an evaluation
# error or a timeout denies the request. data.tp.authz.reason is shown to the
# person whose request was denied. Policies decide on the input below alone;
# http.send and net.lookup_ip_addr are not available.
#
# Check a change before it goes live with "opa check --v1-compatible <dir>";
# tpd reloads this directory when it changes and keeps the previous policy if
# the new one does not compile.
#
# The input each request is decided on:
#   input.action                  "dial", "dial_udp", "listen" or "expose_public"
#   input.identity.user           "alice"
#   input.identity.device         "laptop"
#   input.identity.device_id      "alice@laptop"
#   input.identity.groups         ["dba", "ops"]  (from tpd's user store; may be [])
#   input.identity.serial         certificate serial, lower-case hex
#   input.identity.expiry         certificate expiry, RFC 3339
#   input.destination.host        "db.internal"
#   input.destination.port        5432
#   input.destination.network     "tcp" or "udp"
#   input.destination.ips         ["10.0.0.5"]  (the only addresses TP will dial)
#   input.source.address          "203.0.113.7:51234"
#   input.source.transport        "tls" or "quic"
#   input.time                    RFC 3339 with nanoseconds, UTC
package tp.authz

# Nothing is allowed unless a rule below says so.
default allow := false

# ---------------------------------------------------------------------------
# Examples. Remove the leading "# " to use one.
# ---------------------------------------------------------------------------

# Members of group "dba" may reach PostgreSQL on db.internal:
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

# Everyone may reach HTTPS on the public internet, but not internal addresses
# (private, loopback, link-local - which includes cloud metadata at
# 169.254.169.254 - and unique-local IPv6). The check uses the resolved
# addresses, which are the only ones TP dials:
#
# allow if {
#     input.action == "dial"
#     input.destination.port == 443
#     not internal_destination
# }

# Any resolved address of the destination is internal.
internal_destination if {
	some ip in input.destination.ips
	some cidr in internal_networks
	net.cidr_contains(cidr, ip)
}

internal_networks := [
	"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
	"172.16.0.0/12", "192.168.0.0/16", "::/128", "::1/128", "fc00::/7", "fe80::/10",
]

# Devices of alice may expose a service through a reverse listener:
#
# allow if {
#     input.action == "listen"
#     input.identity.user == "alice"
# }

# ---------------------------------------------------------------------------
# Reasons. A denied person sees the reason; make it say what to do. An allowed
# request has no reason. Rules that set reason directly would conflict with the
# rule below (an evaluation error, so a denial with a generic message); add to
# deny_reason instead.
#
# Add your own by adding to deny_reason, for example:
#
# deny_reason contains "ssh to production needs the ops group; ask #infra" if {
#     input.destination.port == 22
#     endswith(input.destination.host, ".prod.internal")
#     not "ops" in input.identity.groups
# }
# ---------------------------------------------------------------------------

reason := concat("; ", sort(deny_reason)) if {
	not allow
	count(deny_reason) > 0
} else := msg if {
	not allow
	msg := sprintf("no policy rule allows %s to %s %s port %v", [
		input.identity.device_id,
		input.action,
		input.destination.host,
		input.destination.port,
	])
} else := "no policy rule allows this request" if {
	not allow
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
