package authz_test

import (
	"encoding/json"
	"net/netip"
	"slices"
	"testing"

	"github.com/tp-proxy/tp/authz"
)

// Every IPv6 form that carries an IPv4 address is judged by that address: the bad
// inputs are IPv6 addresses that reach 127.0.0.1 (and other IPv4 hosts) through
// SIIT, NAT64 (both prefixes), 6to4, Teredo and the IPv4-compatible form. Before,
// only NAT64's well-known prefix and 6to4 were recognised, so ::ffff:0:7f00:1
// reached the policy with no IPv4 address to judge.
func TestEmbeddedIPv4Forms(t *testing.T) {
	tests := []struct {
		name, ip, want string // want "" means no embedded address
	}{
		{"IPv4-mapped", "::ffff:127.0.0.1", "127.0.0.1"},
		{"SIIT IPv4-translated", "::ffff:0:127.0.0.1", "127.0.0.1"},
		{"SIIT, hex spelling", "::ffff:0:7f00:1", "127.0.0.1"},
		{"NAT64 well-known", "64:ff9b::7f00:1", "127.0.0.1"},
		{"NAT64 well-known, metadata", "64:ff9b::a9fe:a9fe", "169.254.169.254"},
		{"NAT64 local-use", "64:ff9b:1::7f00:1", "127.0.0.1"},
		{"NAT64 local-use, other subnet", "64:ff9b:1:abcd::a00:1", "10.0.0.1"},
		{"6to4", "2002:7f00:1::1", "127.0.0.1"},
		{"6to4, 10/8", "2002:a00:1:2::3", "10.0.0.1"},
		// RFC 4380's example: server 65.54.227.120, client 192.0.2.45 obfuscated.
		{"Teredo, RFC 4380 example", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"},
		{"Teredo of loopback", "2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"},
		{"IPv4-compatible", "::127.0.0.1", "127.0.0.1"},
		{"IPv4-compatible, hex", "::a9fe:a9fe", "169.254.169.254"},
		{"IPv4-compatible, zone ignored", "::a00:1%eth0", "10.0.0.1"},
		{"IPv6 loopback is no IPv4 address", "::1", ""},
		{"IPv6 unspecified is no IPv4 address", "::", ""},
		{"NAT64 neighbour prefix", "64:ff9b:0:1::7f00:1", ""},
		{"ordinary IPv6", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", ""},
		{"unique-local", "fd00::7f00:1", ""},
		{"IPv4", "127.0.0.1", ""},
	}
	for _, tt := range tests {
		got, ok := authz.EmbeddedIPv4(netip.MustParseAddr(tt.ip))
		switch {
		case tt.want == "" && ok:
			t.Errorf("%s: EmbeddedIPv4(%s) = %s; want none", tt.name, tt.ip, got)
		case tt.want != "" && (!ok || got != netip.MustParseAddr(tt.want)):
			t.Errorf("%s: EmbeddedIPv4(%s) = %s, %v; want %s", tt.name, tt.ip, got, ok, tt.want)
		}
	}

	// The policy input reports them in embedded_ipv4, next to the addresses as resolved.
	var ips []netip.Addr
	for _, s := range []string{"::ffff:0:7f00:1", "64:ff9b:1::a9fe:a9fe", "2001:0:4136:e378:8000:63bf:80ff:fffe", "::a00:1", "2002:c0a8:101::1", "::1"} {
		ips = append(ips, netip.MustParseAddr(s))
	}
	raw, err := json.Marshal(authz.Input(authz.Request{Destination: authz.Destination{Host: "x.test", IPs: ips}}))
	if err != nil {
		t.Fatal(err)
	}
	var in struct {
		Destination struct {
			IPs      []string `json:"ips"`
			Embedded []string `json:"embedded_ipv4"`
		} `json:"destination"`
	}
	if err := json.Unmarshal(raw, &in); err != nil {
		t.Fatal(err)
	}
	want := []string{"127.0.0.1", "169.254.169.254", "127.0.0.1", "10.0.0.1", "192.168.1.1"}
	if len(in.Destination.IPs) != len(ips) || !slices.Equal(in.Destination.Embedded, want) {
		t.Fatalf("input ips %v embedded_ipv4 %v; want embedded %v", in.Destination.IPs, in.Destination.Embedded, want)
	}
}
