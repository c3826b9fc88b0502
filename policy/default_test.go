package policy_test

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/policy"
)

// allowEverything is what a careless administrator might add next to the default
// policy: it must not open internal addresses.
const allowEverything = `package tp.authz

allow if input.action == "dial"
`

func ssrfInput(groups []string, host string, ips ...string) map[string]any {
	req := authz.Request{
		Action:      authz.ActionDial,
		Identity:    authz.Identity{DeviceID: "bob@pc", User: "bob", Device: "pc", Groups: groups},
		Destination: authz.Destination{Host: host, Port: 443, Network: "tcp"},
	}
	for _, ip := range ips {
		req.Destination.IPs = append(req.Destination.IPs, netip.MustParseAddr(ip))
	}
	return authz.Input(req)
}

// The default policy refuses every kind of internal address, judged by the IPv4
// address inside IPv4-mapped, NAT64 and 6to4 addresses, even when another file
// allows everything; and a name with one internal address among public ones is
// refused as a whole.
func TestDefaultPolicyDeniesInternalAddresses(t *testing.T) {
	e := load(t, writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy, "all.rego": allowEverything}))
	tests := []struct {
		name  string
		ips   []string
		allow bool
	}{
		{"public IPv4", []string{"93.184.215.14"}, true},
		{"public IPv6", []string{"2606:2800:21f:cb07:6820:80da:af6b:8b2c"}, true},
		{"NAT64 of a public address", []string{"64:ff9b::5db8:d70e"}, true},
		{"6to4 of a public address", []string{"2002:5db8:d70e::1"}, true},
		{"loopback", []string{"127.0.0.1"}, false},
		{"loopback 127/8", []string{"127.255.0.9"}, false},
		{"10/8", []string{"10.1.2.3"}, false},
		{"172.16/12", []string{"172.31.255.1"}, false},
		{"192.168/16", []string{"192.168.1.1"}, false},
		{"link-local", []string{"169.254.1.1"}, false},
		{"AWS/GCP/Azure metadata", []string{"169.254.169.254"}, false},
		{"ECS metadata", []string{"169.254.170.2"}, false},
		{"Alibaba metadata (CGNAT)", []string{"100.100.100.200"}, false},
		{"CGNAT", []string{"100.64.0.1"}, false},
		{"unspecified IPv4", []string{"0.0.0.0"}, false},
		{"this network 0/8", []string{"0.1.2.3"}, false},
		{"multicast", []string{"224.0.0.1"}, false},
		{"broadcast", []string{"255.255.255.255"}, false},
		{"reserved 240/4", []string{"240.0.0.1"}, false},
		{"IPv6 loopback", []string{"::1"}, false},
		{"IPv6 unspecified", []string{"::"}, false},
		{"IPv6 link-local", []string{"fe80::1"}, false},
		{"IPv6 unique-local", []string{"fd12:3456::1"}, false},
		{"AWS IPv6 metadata", []string{"fd00:ec2::254"}, false},
		{"IPv6 multicast", []string{"ff02::1"}, false},
		{"IPv4-compatible loopback", []string{"::7f00:1"}, false},
		{"IPv4-mapped loopback", []string{"::ffff:127.0.0.1"}, false},
		{"NAT64 of metadata", []string{"64:ff9b::a9fe:a9fe"}, false},
		{"NAT64 of loopback", []string{"64:ff9b::127.0.0.1"}, false},
		{"local-use NAT64", []string{"64:ff9b:1::a00:1"}, false},
		{"6to4 of loopback", []string{"2002:7f00:1::1"}, false},
		{"6to4 of 10/8", []string{"2002:a00:1::1"}, false},
		{"Teredo", []string{"2001:0:4136:e378:8000:63bf:3fff:fdd2"}, false},
		// Every IPv6 form that carries an IPv4 address (SIIT was allowed once).
		{"SIIT of loopback", []string{"::ffff:0:7f00:1"}, false},
		{"SIIT of a public address", []string{"::ffff:0:5db8:d70e"}, false},
		{"local-use NAT64 of loopback", []string{"64:ff9b:1::7f00:1"}, false},
		{"Teredo to loopback", []string{"2001:0:4136:e378:8000:63bf:80ff:fffe"}, false},
		{"IPv4-compatible metadata", []string{"::a9fe:a9fe"}, false},
		{"IPv4-compatible public", []string{"::5db8:d70e"}, false},
		{"public then private", []string{"93.184.215.14", "10.0.0.1"}, false},
		{"private then public", []string{"192.168.0.1", "93.184.215.14"}, false},
		{"public then NAT64 metadata", []string{"93.184.215.14", "64:ff9b::a9fe:a9fe"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := e.Eval(context.Background(), ssrfInput(nil, "x.example", tt.ips...))
			if err != nil {
				t.Fatal(err)
			}
			if res.Allow != tt.allow {
				t.Fatalf("allow = %v for %v, want %v (reason %q)", res.Allow, tt.ips, tt.allow, res.Reason)
			}
			if !tt.allow && !strings.Contains(res.Reason, "x.example resolves to an internal address") {
				t.Fatalf("reason %q does not say why", res.Reason)
			}
			if !tt.allow && strings.Contains(res.Reason, tt.ips[len(tt.ips)-1]) {
				t.Fatalf("reason %q reveals the internal address", res.Reason)
			}
		})
	}
}

// allowed_internal opens exactly the networks it names, optionally only for some
// requests; every other internal address stays refused.
func TestAllowedInternal(t *testing.T) {
	const open = `package tp.authz

allowed_internal contains "10.0.0.0/24"

allowed_internal contains "10.9.0.7/32" if "dba" in input.identity.groups
`
	e := load(t, writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy, "all.rego": allowEverything, "open.rego": open}))
	tests := []struct {
		name   string
		groups []string
		ips    []string
		allow  bool
	}{
		{"opened network", nil, []string{"10.0.0.5"}, true},
		{"opened network via NAT64", nil, []string{"64:ff9b::a00:5"}, true},
		{"neighbouring network", nil, []string{"10.0.1.5"}, false},
		{"opened and loopback", nil, []string{"10.0.0.5", "127.0.0.1"}, false},
		{"group-only address, in group", []string{"dba"}, []string{"10.9.0.7"}, true},
		{"group-only address, not in group", []string{"dev"}, []string{"10.9.0.7"}, false},
		{"metadata stays closed", []string{"dba"}, []string{"169.254.169.254"}, false},
	}
	for _, tt := range tests {
		res, err := e.Eval(context.Background(), ssrfInput(tt.groups, "svc.internal", tt.ips...))
		if err != nil {
			t.Fatal(err)
		}
		if res.Allow != tt.allow {
			t.Errorf("%s: allow = %v, want %v (reason %q)", tt.name, res.Allow, tt.allow, res.Reason)
		}
	}
}

// deny wins over allow, its messages become the reason, and a deny that is not a
// set of strings fails closed.
func TestDenyOverridesAllow(t *testing.T) {
	e := load(t, writePolicy(t, map[string]string{"p.rego": `package tp.authz

allow := true

deny contains "port 25 is closed to everyone" if input.destination.port == 25

deny contains "and so is this host" if {
	input.destination.port == 25
	input.destination.host == "mx.example"
}
`}))
	res, err := e.Eval(context.Background(), input("bob", "pc", nil, "dial", "mx.example", 25, "93.184.215.14"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Allow || res.Reason != "and so is this host; port 25 is closed to everyone" || len(res.Deny) != 2 {
		t.Fatalf("got %+v", res)
	}
	res, err = e.Eval(context.Background(), input("bob", "pc", nil, "dial", "mx.example", 587, "93.184.215.14"))
	if err != nil || !res.Allow || res.Reason != "" {
		t.Fatalf("port 587: %+v, %v", res, err)
	}

	bad := load(t, writePolicy(t, map[string]string{"p.rego": "package tp.authz\n\nallow := true\n\ndeny contains 7 if true\n"}))
	if res, err := bad.Eval(context.Background(), input("bob", "pc", nil, "dial", "x", 1)); err == nil {
		t.Fatalf("deny of numbers accepted: %+v", res)
	}
	bad = load(t, writePolicy(t, map[string]string{"p.rego": "package tp.authz\n\nallow := true\n\ndeny := true\n"}))
	if res, err := bad.Eval(context.Background(), input("bob", "pc", nil, "dial", "x", 1)); err == nil {
		t.Fatalf("boolean deny accepted: %+v", res)
	}
}

// A device that no allow rule matches gets one reason for a name, whatever the name
// resolves to: nothing, a public address or an internal one. The bad input is a
// refused device probing names; before, an internal answer changed the reason to
// "resolves to an internal address", telling it the name exists and where it points.
// A device that a rule does allow is still told why the address is refused.
func TestDefaultPolicyReasonIndependentOfAddresses(t *testing.T) {
	const onlyDBA = `package tp.authz

allow if {
	input.action == "dial"
	"dba" in input.identity.groups
}
`
	e := load(t, writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy, "dba.rego": onlyDBA}))
	var first string
	for _, ips := range [][]string{nil, {"93.184.215.14"}, {"10.0.0.5"}, {"::ffff:0:7f00:1"}, {"64:ff9b::a9fe:a9fe"}, {"93.184.215.14", "127.0.0.1"}} {
		res, err := e.Eval(context.Background(), ssrfInput([]string{"dev"}, "probe.internal", ips...))
		if err != nil {
			t.Fatal(err)
		}
		if res.Allow {
			t.Fatalf("%v: allowed a device no rule allows", ips)
		}
		if first == "" {
			first = res.Reason
		}
		if res.Reason != first {
			t.Fatalf("reason for %v is %q; for no addresses it is %q: the reason tells what the name resolves to", ips, res.Reason, first)
		}
	}
	if !strings.Contains(first, "no policy rule allows bob@pc to dial probe.internal port 443") {
		t.Fatalf("reason %q", first)
	}
	res, err := e.Eval(context.Background(), ssrfInput([]string{"dba"}, "probe.internal", "10.0.0.5"))
	if err != nil || res.Allow || !strings.Contains(res.Reason, "probe.internal resolves to an internal address") {
		t.Fatalf("allowed device, internal address: %+v, %v", res, err)
	}
}

// The default policy's reason for a reverse request no rule allows says what
// was asked as authz.Request.Asked does (and as tpd's refusals then read). Bad
// input: each kind of reverse request under the default policy, which allows
// none. It once said "to listen game.rev.tp.internal port 0" and "to
// expose_public  port 20005".
func TestDefaultPolicyReasonSaysWhatWasAsked(t *testing.T) {
	e := load(t, writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy}))
	id := authz.Identity{DeviceID: "alice@laptop", User: "alice", Device: "laptop"}
	for _, tc := range []struct {
		req  authz.Request
		want string
	}{
		{authz.Request{Action: authz.ActionListen, Destination: authz.Destination{Host: "game.rev.tp.internal", Network: "tcp", Reverse: "game"}},
			"listen as game.rev.tp.internal"},
		{authz.Request{Action: authz.ActionExposePublic, Destination: authz.Destination{Network: "tcp", Reverse: "game", Port: 20005}},
			"expose game on public TCP port 20005"},
		{authz.Request{Action: authz.ActionExposePublic, Destination: authz.Destination{Network: "udp", Reverse: "game", Port: 27015}},
			"expose game on public UDP port 27015"},
		{authz.Request{Action: authz.ActionExposePublic, Destination: authz.Destination{Host: "blog.example.org", Network: "tcp", Reverse: "blog", Port: 443}},
			"expose blog by TLS server name blog.example.org"},
		{authz.Request{Action: authz.ActionExposePublic, Destination: authz.Destination{Network: "tcp", Port: 20005}}, // a listen-tcp tunnel
			"open public TCP port 20005"},
		{authz.Request{Action: authz.ActionExposePublic, Destination: authz.Destination{Network: "tcp", Reverse: "game"}},
			"expose game on a public port"},
		{authz.Request{Action: authz.ActionExposeHTTP, Destination: authz.Destination{Host: "wiki.rev.tp.internal", Network: "tcp", Reverse: "wiki"}},
			"serve wiki.rev.tp.internal over HTTP"},
	} {
		tc.req.Identity = id
		if got := tc.req.Asked(); got != tc.want {
			t.Errorf("Asked() = %q; want %q", got, tc.want)
		}
		res, err := e.Eval(context.Background(), authz.Input(tc.req))
		if err != nil {
			t.Fatal(err)
		}
		if want := "no policy rule allows alice@laptop to " + tc.want; res.Allow || res.Reason != want {
			t.Errorf("%s: allow %v, reason %q; want a denial with %q", tc.req.Action, res.Allow, res.Reason, want)
		}
		if strings.Contains(res.Reason, "port 0") || strings.Contains(res.Reason, "  ") {
			t.Errorf("reason %q shows a port or a host nobody asked for", res.Reason)
		}
	}
}
