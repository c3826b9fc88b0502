package policy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/policy"
)

// cacheInputs are requests the default policy allows and denies for different
// reasons (internal addresses, embedded IPv4, groups, reverse names), each in
// two forms that differ only where the policy does not look (source address,
// time).
func cacheInputs() []map[string]any {
	var ins []map[string]any
	add := func(in map[string]any) {
		ins = append(ins, in)
		again := input("x", "y", nil, "dial", "h", 1) // fresh maps
		for k, v := range in {
			again[k] = v
		}
		src := map[string]any{"address": "192.0.2.99:61000", "transport": in["source"].(map[string]any)["transport"]}
		again["source"] = src
		again["time"] = time.Now().Add(time.Minute).UTC().Format(time.RFC3339Nano)
		ins = append(ins, again)
	}
	add(input("alice", "laptop", []string{"dba"}, "dial", "db.internal", 5432, "10.0.0.5"))
	add(input("bob", "pc", []string{"dev"}, "dial", "db.internal", 5432, "10.0.0.5"))
	add(input("bob", "pc", nil, "dial", "example.com", 443, "93.184.216.34"))
	add(input("bob", "pc", nil, "dial", "localhost", 22, "127.0.0.1"))
	add(input("bob", "pc", nil, "dial", "nat64.example", 80, "64:ff9b::a9fe:a9fe"))
	add(input("bob", "pc", nil, "dial_udp", "dns.internal", 53, "10.0.0.53"))
	add(input("carol", "mac", []string{"ops", "dba"}, "listen", "laptop-ssh.tp.internal", 22))
	rev := input("carol", "mac", []string{"ops"}, "dial", "laptop-ssh.tp.internal", 22)
	rev["destination"].(map[string]any)["reverse"] = "laptop-ssh"
	add(rev)
	emb := input("bob", "pc", nil, "dial", "v6.example", 443, "2002:a00:5::1")
	emb["destination"].(map[string]any)["embedded_ipv4"] = []any{"10.0.0.5"}
	add(emb)
	return ins
}

// TestCacheEqualsUncached: for every input, the cached engine's first and repeated
// answers equal an uncached engine's, and repeats (also of inputs that differ only
// in what the policy does not read) come from the cache.
func TestCacheEqualsUncached(t *testing.T) {
	for name, src := range map[string]string{"default": policy.DefaultPolicy, "group": groupPolicy} {
		t.Run(name, func(t *testing.T) {
			dir := writePolicy(t, map[string]string{"tp.rego": src})
			cached, plain := load(t, dir), load(t, dir, policy.WithoutCache())
			if ok, why := cached.Cached(); !ok {
				t.Fatalf("policy %s is not cached: %s", name, why)
			}
			if ok, why := plain.Cached(); ok || !strings.Contains(why, "turned off") {
				t.Fatalf("WithoutCache: Cached() = %v, %q", ok, why)
			}
			ctx := context.Background()
			for round := range 2 {
				for i, in := range cacheInputs() {
					want, err := plain.Eval(ctx, in)
					if err != nil {
						t.Fatal(err)
					}
					got, err := cached.Eval(ctx, in)
					if err != nil {
						t.Fatal(err)
					}
					if want.Cached {
						t.Fatalf("input %d: an uncached engine answered from a cache", i)
					}
					// The second of each pair differs only in source and time,
					// which neither policy reads: it is a hit from the first.
					if hit := round > 0 || i%2 == 1; got.Cached != hit {
						t.Fatalf("round %d input %d: Cached = %v, want %v", round, i, got.Cached, hit)
					}
					got.Cached = false
					if !reflect.DeepEqual(got, want) {
						t.Fatalf("round %d input %d: cached %+v, uncached %+v", round, i, got, want)
					}
				}
			}
		})
	}
}

// TestCacheKeyHoldsWhatThePolicyReads: a policy that reads source.address is
// asked again for a different address, and a present-but-empty field is not taken
// for an absent one.
func TestCacheKeyHoldsWhatThePolicyReads(t *testing.T) {
	e := load(t, writePolicy(t, map[string]string{"tp.rego": `package tp.authz

default allow := false

allow if input.source.address == "192.0.2.1:40000"

reason := "reverse present" if input.destination.reverse == ""
`}))
	ctx := context.Background()
	in := input("bob", "pc", nil, "dial", "h.example", 22)
	if r, err := e.Eval(ctx, in); err != nil || !r.Allow {
		t.Fatalf("first: %+v, %v", r, err)
	}
	other := input("bob", "pc", nil, "dial", "h.example", 22)
	other["source"] = map[string]any{"address": "192.0.2.1:40001", "transport": "tls"}
	if r, err := e.Eval(ctx, other); err != nil || r.Allow || r.Cached {
		t.Fatalf("another source address was answered %+v, %v; want a fresh denial", r, err)
	}
	withRev := input("bob", "pc", nil, "dial", "h.example", 22)
	withRev["destination"].(map[string]any)["reverse"] = ""
	if r, err := e.Eval(ctx, withRev); err != nil || r.Cached || r.Reason != "reverse present" {
		t.Fatalf("an empty reverse was answered %+v, %v; want a fresh answer naming it", r, err)
	}
}

// TestCacheSwapInvalidates: after a Reload that activates a new policy, the same
// input gets the new policy's answer, not the cached one.
func TestCacheSwapInvalidates(t *testing.T) {
	dir := writePolicy(t, map[string]string{"tp.rego": "package tp.authz\n\ndefault allow := true\n"})
	e := load(t, dir)
	ctx := context.Background()
	in := input("bob", "pc", nil, "dial", "db.internal", 5432, "10.0.0.5")
	for range 2 {
		if r, err := e.Eval(ctx, in); err != nil || !r.Allow {
			t.Fatalf("before the swap: %+v, %v", r, err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "tp.rego"), []byte("package tp.authz\n\ndefault allow := false\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	r, err := e.Eval(ctx, in)
	if err != nil || r.Allow || r.Cached || r.Revision != e.Revision() {
		t.Fatalf("after the swap: %+v, %v; want a fresh denial by revision %s", r, err, e.Revision())
	}
}

// TestCacheOffForPoliciesThatLookElsewhere: policies whose answer can change
// between identical requests are never cached, and Cached says why.
func TestCacheOffForPoliciesThatLookElsewhere(t *testing.T) {
	for name, c := range map[string]struct{ rule, why string }{
		"clock": {`allow if time.now_ns() > 0`, "time.now_ns"},
		"clock in a function": {`f(x) := time.now_ns() + x
allow if f(1) > 0`, "time.now_ns"},
		"random":     {`allow if rand.intn("x", 2) == 0`, "rand.intn"},
		"uuid":       {`allow if uuid.rfc4122("x") != ""`, "uuid.rfc4122"},
		"runtime":    {`allow if opa.runtime() != {}`, "opa.runtime"},
		"x509 clock": {`allow if { [ok, _] := crypto.x509.parse_and_verify_certificates(input.identity.serial); ok }`, "crypto.x509.parse_and_verify_certificates"},
		"input.time": {`allow if time.parse_rfc3339_ns(input.time) > 0`, "input.time"},
		"time by import": {`import input.time as t
allow if t != ""`, "input.time"},
		"whole input":  {`allow if object.get(input, "time", "") != ""`, "as a whole"},
		"computed key": {`allow if { some k; input[k] == "dial" }`, "computed key"},
	} {
		t.Run(name, func(t *testing.T) {
			e := load(t, writePolicy(t, map[string]string{"tp.rego": "package tp.authz\n\ndefault allow := false\n\n" + c.rule + "\n"}))
			ok, why := e.Cached()
			if ok || !strings.Contains(why, c.why) {
				t.Fatalf("Cached() = %v, %q; want false, naming %q", ok, why, c.why)
			}
			in := input("bob", "pc", nil, "dial", "db.internal", 5432, "10.0.0.5")
			for range 2 {
				r, _ := e.Eval(context.Background(), in)
				if r.Cached {
					t.Fatal("an uncacheable policy answered from the cache")
				}
			}
		})
	}
}

// TestCacheNeverAllowsRevokedOrExpired: an allowed identity's decision is cached;
// once its device is deny-listed, or its certificate has expired, or its user
// lost the group the policy wants, the same request is denied.
func TestCacheNeverAllowsRevokedOrExpired(t *testing.T) {
	eng := loadPolicy(t, dbaPolicy)
	var log bytes.Buffer
	deny := &authz.DenyList{}
	a := &policy.Authorizer{
		Directory: &mapDirectory{groups: map[string][]string{}},
		Evaluator: eng, DenyList: deny, Decisions: policy.NewDecisionLog(&log),
	}
	ctx := context.Background()
	id := identity("alice", "laptop", "dba")
	req := dial(id, "db.internal", 5432, "10.0.0.5")
	for range 2 {
		if d, err := a.Authorize(ctx, req); err != nil || !d.Allow {
			t.Fatalf("before: %+v, %v", d, err)
		}
	}
	lines := strings.Split(strings.TrimSpace(log.String()), "\n")
	var second policy.Decision
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &second); err != nil {
		t.Fatal(err)
	}
	if !second.Cached || second.Decision != "allow" {
		t.Fatalf("the repeated decision's log line is %s; want an allow marked cached", lines[len(lines)-1])
	}

	expired := req
	expired.Time = id.NotAfter.Add(time.Second)
	if d, _ := a.Authorize(ctx, expired); d.Allow || !strings.Contains(d.Reason, "expired") {
		t.Fatalf("expired certificate: %+v; want a denial saying it expired", d)
	}
	lost := dial(identity("alice", "laptop"), "db.internal", 5432, "10.0.0.5")
	if d, _ := a.Authorize(ctx, lost); d.Allow {
		t.Fatalf("a user who lost the dba group was allowed: %+v", d)
	}
	deny.Add(authz.DenyDevice, "alice@laptop")
	if d, _ := a.Authorize(ctx, req); d.Allow || d.Revision != "" {
		t.Fatalf("deny-listed device: %+v; want a denial by the deny list", d)
	}
}
