package policy_test

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/policy"
)

const ipGrantPolicy = `package tp.authz

default allow := false

allow if input.action == "ip"

ip := {
	"routes": ["10.1.0.0/16", {"prefix": "10.2.0.0/24", "protocol": "tcp"}, {"prefix": "fd00::/64", "protocol": 17}],
	"addresses": ["100.64.0.7"],
} if input.identity.user == "alice"

ip := {"routes": ["10.1.0.1/16"]} if input.identity.user == "bob"
`

// An allowed "ip" decision carries the policy's grant, read from real OPA; a
// malformed grant (bob's prefix has host bits set) denies with an error.
func TestIPGrantFromPolicy(t *testing.T) {
	p := &policy.Authorizer{Directory: &mapDirectory{}, Evaluator: loadPolicy(t, ipGrantPolicy)}
	d, err := p.Authorize(context.Background(), authz.Request{Action: authz.ActionIP, Identity: identity("alice", "laptop")})
	if err != nil || !d.Allow || d.IP == nil {
		t.Fatalf("alice: %+v, %v", d, err)
	}
	want := []authz.IPRoute{{Prefix: netip.MustParsePrefix("10.1.0.0/16")}, {Prefix: netip.MustParsePrefix("10.2.0.0/24"), Protocol: 6},
		{Prefix: netip.MustParsePrefix("fd00::/64"), Protocol: 17}}
	if !slices.Equal(d.IP.Routes, want) || !slices.Equal(d.IP.Addresses, []netip.Prefix{netip.MustParsePrefix("100.64.0.7/32")}) {
		t.Fatalf("grant %+v", d.IP)
	}
	d, err = p.Authorize(context.Background(), authz.Request{Action: authz.ActionIP, Identity: identity("bob", "pc")})
	if err == nil || d.Allow || !strings.Contains(err.Error(), "10.1.0.0/16") {
		t.Fatalf("bob's malformed grant: %+v, %v; want a denial naming the masked prefix", d, err)
	}
	// Other actions carry no grant.
	if d, _ := p.Authorize(context.Background(), dial(identity("alice", "laptop"), "x", 1, "10.0.0.1")); d.IP != nil {
		t.Fatalf("a dial decision carries an IP grant: %+v", d.IP)
	}
}

func TestParseIPGrantRefuses(t *testing.T) {
	for name, doc := range map[string]any{
		"not an object":    "10.0.0.0/8",
		"unknown key":      map[string]any{"route": []any{"10.0.0.0/8"}},
		"bad prefix":       map[string]any{"routes": []any{"10.0.0/8"}},
		"bad protocol":     map[string]any{"routes": []any{map[string]any{"prefix": "10.0.0.0/8", "protocol": "sctp!"}}},
		"protocol 256":     map[string]any{"routes": []any{map[string]any{"prefix": "10.0.0.0/8", "protocol": 256.0}}},
		"address a number": map[string]any{"addresses": []any{7.0}},
	} {
		if _, err := policy.ParseIPGrant(doc); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
