package tpd

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testdns"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// allowAliceDials lets alice dial anything the default policy's internal-address
// rule leaves open; bob has no rule at all.
const allowAliceDials = `package tp.authz

allow if {
	input.action == "dial"
	input.identity.user == "alice"
}
`

func refusal(t *testing.T, err error) *clients.RefusedError {
	t.Helper()
	var re *clients.RefusedError
	if !errors.As(err, &re) {
		t.Fatalf("err = %v; want a refusal", err)
	}
	return re
}

// Every IPv6 form that carries an IPv4 address is refused by the default policy,
// whether the client gives it as a literal or a real DNS server answers it as
// AAAA. The bad inputs reach 127.0.0.1 (or 169.254.169.254) through SIIT, NAT64's
// two prefixes, 6to4, Teredo and the IPv4-compatible form; before, SIIT
// (::ffff:0:127.0.0.1, an AAAA of ::ffff:0:7f00:1) was allowed and dialled.
func TestDefaultPolicyRefusesEmbeddedIPv4Forms(t *testing.T) {
	t.Parallel()
	dns := testdns.Start(t)
	cfg := newDataDir(t, map[string]string{"alice.rego": allowAliceDials})
	r := runDaemon(t, cfg, WithResolver(dns.Resolver()))
	alice, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	forms := []struct{ name, ip string }{
		{"SIIT", "::ffff:0:127.0.0.1"},
		{"SIIT, hex", "::ffff:0:7f00:1"},
		{"NAT64 well-known", "64:ff9b::7f00:1"},
		{"NAT64 well-known, metadata", "64:ff9b::a9fe:a9fe"},
		{"NAT64 local-use", "64:ff9b:1::7f00:1"},
		{"6to4", "2002:7f00:1::1"},
		{"Teredo, client 127.0.0.1 obfuscated", "2001:0:4136:e378:8000:63bf:80ff:fffe"},
		{"IPv4-compatible", "::127.0.0.1"},
	}
	for i, f := range forms {
		literal := net.JoinHostPort(f.ip, "80")
		if re := refusal(t, dialEcho(t, alice, literal)); re.Code != wire.CodePolicyDenied || !strings.Contains(re.Reason, "an internal address") {
			t.Errorf("%s literal %s: %s %q; want a policy denial for an internal address", f.name, f.ip, re.Code, re.Reason)
		}
		name := "form" + string(rune('a'+i)) + ".test"
		dns.Set(name, netip.MustParseAddr(f.ip))
		if re := refusal(t, dialEcho(t, alice, name+":80")); re.Code != wire.CodePolicyDenied || !strings.Contains(re.Reason, name+" resolves to an internal address") {
			t.Errorf("%s AAAA %s: %s %q; want a policy denial for an internal address", f.name, f.ip, re.Code, re.Reason)
		}
	}
}

// Probing names through the real tpd and its default policy, with a real DNS
// client and server: bob, whom no rule allows, gets the same refusal for a name
// whatever it resolves to (nothing, a public address, an internal one), so he
// cannot map the network. Alice, whom a rule allows, learns that a missing name
// does not resolve, without the resolver's address or its answer. Before, bob got
// resolve_failed with "lookup probe.test on <resolver>:53: no such host" for a
// missing name and a different reason for an internal one.
func TestProbingNamesRevealsNothing(t *testing.T) {
	t.Parallel()
	dns := testdns.Start(t)
	cfg := newDataDir(t, map[string]string{"alice.rego": allowAliceDials})
	r := runDaemon(t, cfg, WithResolver(dns.Resolver()))
	alice, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	bob, _, _ := enrollClient(t, r.d, r.url, "bob", "pc")

	var first string
	for _, answer := range [][]netip.Addr{
		{netip.MustParseAddr("10.0.0.5")},
		{netip.MustParseAddr("::ffff:0:a00:5")},
		{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")},
		nil, // NXDOMAIN
	} {
		dns.Set("probe.test", answer...)
		err := dialEcho(t, bob, "probe.test:5432")
		re := refusal(t, err)
		if first == "" {
			first = err.Error()
			if re.Code != wire.CodePolicyDenied || !errors.Is(err, authz.ErrPolicyDenied) {
				t.Fatalf("bob: %v; want a policy denial", err)
			}
		}
		if err.Error() != first {
			t.Fatalf("bob tells the answers apart: for %v he is told %q, for the first %q", answer, err.Error(), first)
		}
	}

	re := refusal(t, dialEcho(t, alice, "probe.test:5432"))
	if re.Code != wire.CodeResolveFailed || re.Reason != "cannot resolve probe.test" {
		t.Fatalf("alice, missing name: %s %q; want resolve_failed \"cannot resolve probe.test\"", re.Code, re.Reason)
	}
	waitLog(t, r, "lookup probe.test")
	dns.Set("probe.test", netip.MustParseAddr("10.0.0.5"))
	re = refusal(t, dialEcho(t, alice, "probe.test:5432"))
	if re.Code != wire.CodePolicyDenied || strings.Contains(re.Reason, "10.0.0.5") || !strings.Contains(re.Reason, "internal address") {
		t.Fatalf("alice, internal name: %s %q; want a denial that does not name the address", re.Code, re.Reason)
	}
}

// Reverse names too: carol, whom the policy does not let dial "svc", is told the
// same thing whether an agent serves the name or not. Before, the name was looked
// up before the policy was asked, so she got reverse_unknown ("no agent serves
// svc.rev.tp.internal") until alice's agent registered it and a policy denial
// afterwards: she could watch which names are served and when.
func TestProbingReverseNamesRevealsNothing(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, reversePolicy)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	carol, _, _ := enrollClient(t, d, url, "carol", "pc")
	probe := func() string {
		_, err := dialReverse(carol, clients.TransportTLS, []byte("x"))
		if re := refusal(t, err); re.Code != wire.CodePolicyDenied {
			t.Fatalf("carol: %v; want a policy denial", err)
		}
		return err.Error()
	}
	unserved := probe()
	stop, _ := startAgent(t, alice, clients.TransportTLS, testnet.Upper(t), []string{"carol"}, nil)
	served := probe()
	stop()
	if after := probe(); served != unserved || after != unserved {
		t.Fatalf("carol tells the states apart:\n unserved %q\n served   %q\n after    %q", unserved, served, after)
	}
}

// allowByAddress lets carol dial what resolves into 192.0.2.0/24 only: a rule
// that needs the addresses before it can answer.
const allowByAddress = `package tp.authz

allow if {
	input.action == "dial"
	input.identity.user == "carol"
	some ip in input.destination.ips
	net.cidr_contains("192.0.2.0/24", ip)
}
`

// Bad input: bob, whom no rule allows, dials names of his choosing
// (a-secret-in-a-label.exfil.test, …) to make tpd send DNS queries out of the
// network. tpd must refuse him without a lookup: the policy decides on the name
// first, and no address could make his request allowed. Alice, whom a rule
// allows whatever the address, gets her name looked up; so does carol, whose
// rule needs the addresses to decide. Before, every name was resolved before
// the policy was asked.
func TestNoLookupForNamesNoAddressCouldAllow(t *testing.T) {
	dns := testdns.Start(t)
	cfg := newDataDir(t, map[string]string{"alice.rego": allowAliceDials, "carol.rego": allowByAddress})
	r := runDaemon(t, cfg, WithResolver(dns.Resolver()))
	alice, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	bob, _, _ := enrollClient(t, r.d, r.url, "bob", "pc")
	carol, _, _ := enrollClient(t, r.d, r.url, "carol", "pc")
	dns.Set("alice.test", netip.MustParseAddr("127.0.0.1")) // internal: the default policy refuses it, after the lookup

	for _, name := range []string{"a-secret-in-a-label.exfil.test", "another.exfil.test"} {
		if re := refusal(t, dialEcho(t, bob, name+":443")); re.Code != wire.CodePolicyDenied {
			t.Fatalf("bob dialling %s: %s %q; want a policy denial", name, re.Code, re.Reason)
		}
	}
	// carol's rule decides on the addresses: her name is looked up, and a
	// name that resolves outside her network is refused after the lookup.
	dns.Set("carol.test", netip.MustParseAddr("203.0.113.10"))
	if re := refusal(t, dialEcho(t, carol, "carol.test:443")); re.Code != wire.CodePolicyDenied {
		t.Fatalf("carol dialling carol.test (outside 192.0.2.0/24): %s %q; want a policy denial", re.Code, re.Reason)
	}
	// alice's rule allows any name: hers is looked up, and the default
	// policy's deny rule refuses its loopback address.
	if re := refusal(t, dialEcho(t, alice, "alice.test:443")); re.Code != wire.CodePolicyDenied || !strings.Contains(re.Reason, "internal address") {
		t.Fatalf("alice dialling alice.test (127.0.0.1): %s %q; want a denial for an internal address", re.Code, re.Reason)
	}

	asked := dns.Asked()
	for _, name := range asked {
		if strings.HasSuffix(name, "exfil.test") {
			t.Errorf("tpd looked up %s, which bob named and no address could get allowed (asked: %v)", name, asked)
		}
	}
	for _, want := range []string{"alice.test", "carol.test"} {
		if !slices.Contains(asked, want) {
			t.Errorf("tpd did not look up %s, whose decision needs (or follows) its addresses (asked: %v)", want, asked)
		}
	}
}
