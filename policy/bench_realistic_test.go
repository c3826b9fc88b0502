package policy_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/policy"
)

// realisticPolicy is the default policy plus 20 allow rules over 50 groups and a
// few opened internal networks: the size of a small company's policy.
func realisticPolicy() map[string]string {
	var b strings.Builder
	b.WriteString("package tp.authz\n\n")
	for i := range 20 {
		fmt.Fprintf(&b, `allow if {
	input.action == "dial"
	input.destination.host == "svc%d.internal"
	input.destination.port in {22, 443, %d}
	some g in input.identity.groups
	g in {"team%d", "team%d", "ops"}
}

`, i, 5000+i, i, i+20)
	}
	for i := range 5 {
		fmt.Fprintf(&b, "allowed_internal contains \"10.%d.0.0/16\"\n", i)
	}
	return map[string]string{"tp.rego": policy.DefaultPolicy, "rules.rego": b.String()}
}

func realisticInput(i int) map[string]any {
	groups := make([]string, 0, 50)
	for g := range 50 {
		groups = append(groups, fmt.Sprintf("team%d", (g*7+i)%50))
	}
	slices.Sort(groups)
	return authz.Input(authz.Request{
		Action:      authz.ActionDial,
		Identity:    authz.Identity{DeviceID: "alice@laptop", User: "alice", Device: "laptop", Groups: groups, Serial: "1f", NotAfter: time.Now().Add(time.Hour)},
		Destination: authz.Destination{Host: fmt.Sprintf("svc%d.internal", i%20), Port: 22, Network: "tcp", IPs: []netip.Addr{netip.MustParseAddr(fmt.Sprintf("10.%d.0.5", i%5))}},
		Source:      authz.Source{Address: "192.0.2.7:50000", Transport: "tls"},
		Time:        time.Now(),
	})
}

// BenchmarkDecisionRealistic reports the latency of one decision (p50 and p99 in
// µs) for realisticPolicy, with the prepared query TP uses.
func BenchmarkDecisionRealistic(b *testing.B) {
	e := load(b, writePolicy(b, realisticPolicy()), policy.WithoutCache()) // the evaluation, not the decision cache
	ctx := context.Background()
	inputs := make([]map[string]any, 40)
	for i := range inputs {
		inputs[i] = realisticInput(i)
	}
	if res, err := e.Eval(ctx, inputs[0]); err != nil || !res.Allow {
		b.Fatalf("realistic input not allowed: %+v %v", res, err)
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		start := time.Now()
		if _, err := e.Eval(ctx, inputs[i%len(inputs)]); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
}
