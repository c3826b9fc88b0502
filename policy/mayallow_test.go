package policy_test

import (
	"context"
	"testing"

	"github.com/tp-proxy/tp/policy"
)

const mayAllowPolicy = `package tp.authz

default allow := false

# by name alone
allow if {
	input.identity.user == "alice"
	input.destination.host == "db.internal"
}

# by address alone
allow if {
	input.identity.user == "bob"
	some ip in input.destination.ips
	net.cidr_contains("10.0.0.0/8", ip)
}

# by name, unless an address is excluded
allow if {
	input.identity.user == "carol"
	endswith(input.destination.host, ".corp")
	not "10.9.9.9" in input.destination.ips
}
`

// MayAllow answers false only where no addresses could make Eval allow, and
// true wherever some could: checked against Eval with several address sets.
// The defaults policy's deny rules judge addresses, but only allow rules can
// open a request, so a user no allow rule names is refused before any lookup.
func TestMayAllow(t *testing.T) {
	ctx := context.Background()
	e := load(t, writePolicy(t, map[string]string{"p.rego": mayAllowPolicy}))
	def := load(t, writePolicy(t, map[string]string{policy.DefaultFile: policy.DefaultPolicy, "alice.rego": "package tp.authz\n\nallow if input.identity.user == \"alice\"\n"}))
	addressSets := [][]string{nil, {"10.0.0.5"}, {"10.9.9.9"}, {"192.0.2.1"}, {"127.0.0.1"}}
	for _, tc := range []struct {
		name       string
		e          *policy.Engine
		user, host string
		want       bool
	}{
		{"name rule, its name", e, "alice", "db.internal", true},
		{"name rule, another name", e, "alice", "exfil.example", false},
		{"address rule, any name", e, "bob", "exfil.example", true},
		{"name rule with an address exception", e, "carol", "x.corp", true},
		{"name rule with an address exception, another name", e, "carol", "x.example", false},
		{"no rule for the user", e, "dave", "db.internal", false},
		{"default policy, allowed user", def, "alice", "anything.example", true},
		{"default policy, no rule for the user", def, "bob", "anything.example", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := input(tc.user, "pc", nil, "dial", tc.host, 443, "10.0.0.5")
			got, err := tc.e.MayAllow(ctx, in)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("MayAllow(%s → %s) = %v; want %v", tc.user, tc.host, got, tc.want)
			}
			anyAllowed := false
			for _, ips := range addressSets {
				res, err := tc.e.Eval(ctx, input(tc.user, "pc", nil, "dial", tc.host, 443, ips...))
				if err != nil {
					t.Fatal(err)
				}
				anyAllowed = anyAllowed || res.Allow
			}
			if !got && anyAllowed {
				t.Errorf("MayAllow said no addresses could allow %s → %s, but Eval allowed it for one of %v", tc.user, tc.host, addressSets)
			}
			// Asked again, the answer comes from the cache and is the same.
			if again, err := tc.e.MayAllow(ctx, in); err != nil || again != got {
				t.Errorf("asked again: %v, %v; want %v", again, err, got)
			}
		})
	}
}

// Bad input: policies whose allow is no boolean, or conflicts. They load as
// before (the partial query's type check does not refuse them) and every Eval
// fails, so the request is denied; MayAllow may answer either way (true only
// costs a lookup) but must not fail the load or panic.
func TestMayAllowLeavesBrokenPoliciesToEval(t *testing.T) {
	for _, src := range []string{
		"package tp.authz\n\nallow := \"yes\"\n",
		"package tp.authz\n\nallow := true if input.action == \"dial\"\n\nallow := false if input.destination.port == 443\n",
	} {
		e := load(t, writePolicy(t, map[string]string{"p.rego": src}))
		in := input("bob", "pc", nil, "dial", "x.example", 443)
		_, _ = e.MayAllow(context.Background(), in)
		if res, err := e.Eval(context.Background(), in); err == nil || res.Allow {
			t.Errorf("policy %q: Eval = %+v, %v; want an error and a denial", src, res, err)
		}
	}
}
