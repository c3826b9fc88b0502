package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/policy"
)

const (
	policyRules  = 20
	policyGroups = 50
)

// realisticPolicy has policyRules allow rules over policyGroups groups: exact hosts
// with port sets, suffix and glob matches, a CIDR rule, a block list of metadata and
// link-local addresses, and a reason built with sprintf — the shapes real policies use.
func realisticPolicy() string {
	var b strings.Builder
	b.WriteString(`package tp.authz

default allow := false

blocked if {
	some ip in input.destination.ips
	some cidr in {"169.254.0.0/16", "127.0.0.0/8", "fd00:ec2::/32"}
	net.cidr_contains(cidr, ip)
}

`)
	g := func(i int) string { return fmt.Sprintf("%q", fmt.Sprintf("team-%02d", i%policyGroups)) }
	for i := range policyRules {
		groups := fmt.Sprintf("{%s, %s, %s}", g(i), g(i+17), g(i+33))
		b.WriteString("allow if {\n\tinput.action == \"dial\"\n\tnot blocked\n")
		switch {
		case i < 12:
			fmt.Fprintf(&b, "\tinput.destination.host == \"svc%02d.internal.example.org\"\n\tinput.destination.port in {22, 443, %d}\n", i, 5000+i)
		case i < 16:
			fmt.Fprintf(&b, "\tendswith(input.destination.host, \".zone%02d.internal.example.org\")\n\tinput.destination.port == 22\n", i)
		case i < 19:
			fmt.Fprintf(&b, "\tglob.match(\"db-*.zone%02d.example.org\", [\".\"], input.destination.host)\n\tinput.destination.port == 5432\n", i)
		default:
			b.WriteString("\tsome ip in input.destination.ips\n\tnet.cidr_contains(\"10.20.0.0/16\", ip)\n")
		}
		fmt.Fprintf(&b, "\tsome g in input.identity.groups\n\tg in %s\n}\n\n", groups)
	}
	b.WriteString(`reason := sprintf("%s:%d is not allowed for %s (groups: %v)", [
	input.destination.host, input.destination.port,
	input.identity.device_id, input.identity.groups,
]) if not allow
`)
	return b.String()
}

// policyInputs are a fixed, mixed set of allowed and denied requests.
func policyInputs() []map[string]any {
	r := rand.New(rand.NewPCG(7, 7))
	hosts := []string{"svc03.internal.example.org", "svc11.internal.example.org", "a.zone13.internal.example.org",
		"db-main.zone17.example.org", "api.example.com", "svc07.internal.example.org"}
	var in []map[string]any
	for i := range 64 {
		groups := make([]string, 5)
		for j := range groups {
			groups[j] = fmt.Sprintf("team-%02d", r.IntN(policyGroups))
		}
		ip := netip.AddrFrom4([4]byte{10, byte(r.IntN(40)), byte(r.IntN(256)), byte(1 + r.IntN(250))})
		in = append(in, authz.Input(authz.Request{
			Action: "dial",
			Identity: authz.Identity{DeviceID: fmt.Sprintf("user%d@laptop", i), User: fmt.Sprintf("user%d", i),
				Device: "laptop", Groups: groups, Serial: "1a2b3c4d5e6f", NotAfter: time.Now().Add(4 * time.Hour)},
			Destination: authz.Destination{Host: hosts[i%len(hosts)], Port: []int{22, 443, 5432, 5003}[r.IntN(4)],
				Network: "tcp", IPs: []netip.Addr{ip}},
			Source: authz.Source{Address: "203.0.113.7:51234", Transport: "tls"},
			Time:   time.Now(),
		}))
	}
	return in
}

func policyLatency(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "7 policy decision"
	// The evaluation's cost: tpd's decision cache would answer the repeated
	// inputs below without evaluating. The last variant shows the cache.
	load := func(name, src string, opts ...policy.Option) (*policy.Engine, error) {
		dir := filepath.Join(e.dir, "policy-"+name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, "tp.rego"), []byte(src), 0o600); err != nil {
			return nil, err
		}
		return policy.Load(ctx, dir, append([]policy.Option{policy.WithTimeout(time.Second)}, opts...)...)
	}
	small, err := load("small", benchPolicy, policy.WithoutCache())
	if err != nil {
		return nil, err
	}
	big, err := load("realistic", realisticPolicy(), policy.WithoutCache())
	if err != nil {
		return nil, err
	}
	bigCached, err := load("realistic-cached", realisticPolicy())
	if err != nil {
		return nil, err
	}
	inputs := policyInputs()
	allowed := 0
	for _, in := range inputs {
		if r, err := big.Eval(ctx, in); err != nil {
			return nil, err
		} else if r.Allow {
			allowed++
		}
	}
	e.log("realistic policy allows %d of %d inputs", allowed, len(inputs))
	mk := func(name, baseline string, eng *policy.Engine) *variant {
		p50 := &Row{Scenario: scn, Variant: name + ", p50", Transport: "-", Unit: "µs"}
		p99 := &Row{Scenario: scn, Variant: name + ", p99", Transport: "-", Unit: "µs"}
		if baseline != "" {
			p50.Baseline, p99.Baseline = baseline+", p50", baseline+", p99"
			p50.Note = fmt.Sprintf("%d of %d inputs allowed", allowed, len(inputs))
		}
		return &variant{rows: []*Row{p50, p99}, fn: func() ([]float64, error) {
			us := make([]float64, 0, sz.policyEvals)
			for i := range sz.policyEvals {
				start := time.Now()
				if _, err := eng.Eval(ctx, inputs[i%len(inputs)]); err != nil {
					return nil, err
				}
				us = append(us, float64(time.Since(start))/float64(time.Microsecond))
			}
			slices.Sort(us)
			return []float64{percentile(us, 50), percentile(us, 99)}, nil
		}}
	}
	base := "1-rule policy (tpbench's)"
	bigName := fmt.Sprintf("%d rules, %d groups", policyRules, policyGroups)
	vs := []*variant{
		mk(base, "", small),
		mk(bigName, base, big),
		mk(bigName+", decision cache", bigName, bigCached),
	}
	e.interleave(runs, vs)
	return collect(vs), nil
}
