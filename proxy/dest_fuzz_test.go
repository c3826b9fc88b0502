package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Fuzz targets for what decides where a request goes: DATAGRAM flow ids, the
// destination canonicaliser and reverse names.

// recordingResolver remembers the names it was asked for and answers none, so
// the target sees what the server would look up without any network.
type recordingResolver struct{ asked []string }

var errNoAnswer = errors.New("no answer in this test")

func (r *recordingResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	r.asked = append(r.asked, host)
	return nil, errNoAnswer
}

// FuzzDestination: the host of a client hello, as the server resolves it.
// Canonicalising twice changes nothing; what the policy is shown is what is
// dialled: an address in any spelling a resolver would take as one is shown and
// dialled as that address and never looked up as a name, and a name is looked up
// exactly as shown and reads as no address to any parser.
func FuzzDestination(f *testing.F) {
	for _, s := range []string{
		"db.internal", "DB.Internal.", "127.1", "0x7f.0.0.1", "2130706433", "017700000001",
		"[::1]", "[::ffff:127.0.0.1]", "::ffff:10.0.0.1", "fe80::1%eth0", "1.2.3.4.5", "0x1g",
		"laptop-ssh.rev.tp.internal", "a..b", "-.x", "x_y.example", "[1.2.3.4]", "0.0.0.0", "::",
		"4294967295", "4294967296", "1.16777215", "1.2.65535", "09.1.1.1", "0x", "0x.1.1.1",
		"::ffff:0:127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::", "::127.0.0.1", "2001:0:4136:e378:8000:63bf:80ff:fffe",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, host string) {
		if wire.ValidHost(host) != nil {
			return // refused by ReadClientHello before it gets here
		}
		c, err := CanonicalHost(host)
		if err != nil {
			return
		}
		if c2, err := CanonicalHost(c); err != nil || c2 != c {
			t.Fatalf("CanonicalHost(%q) = %q, but CanonicalHost(%q) = %q, %v", host, c, c, c2, err)
		}
		if c != strings.ToLower(c) || strings.HasSuffix(c, ".") {
			t.Fatalf("CanonicalHost(%q) = %q: not lower-case without a trailing dot", host, c)
		}
		// Spellings of an address: what they mean is what c says.
		bare := strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
		var want netip.Addr
		if ip, err := netip.ParseAddr(bare); err == nil {
			want = ip.Unmap()
		} else if ip, ok := parseInetAton(strings.TrimSuffix(strings.ToLower(host), ".")); ok {
			want = ip
		}
		if want.IsValid() && c != want.String() {
			t.Fatalf("CanonicalHost(%q) = %q, but the host means address %s", host, c, want)
		}

		rr := &recordingResolver{}
		s := &Server{cfg: Config{Resolver: rr, DialTimeout: time.Second}}
		ips, lookupErr, herr := s.resolve(context.Background(), host)
		if ip, err := netip.ParseAddr(c); err == nil {
			// An address: shown and dialled as itself, never looked up.
			if herr != nil || lookupErr != nil || len(ips) != 1 || ips[0] != ip || ips[0].String() != c || len(rr.asked) != 0 {
				t.Fatalf("address %q (canonical %q): resolved to %v, %v, %v; looked up %q", host, c, ips, lookupErr, herr, rr.asked)
			}
			if ip.Is4In6() || ip.Zone() != "" {
				t.Fatalf("CanonicalHost(%q) = %q, not unmapped and zone-free", host, c)
			}
			return
		}
		// A name: looked up exactly as the policy sees it, and no address to anyone.
		if len(rr.asked) != 1 || rr.asked[0] != c || herr != nil || !errors.Is(lookupErr, errNoAnswer) || len(ips) != 0 {
			t.Fatalf("name %q (canonical %q): looked up %q: %v, %v, %v", host, c, rr.asked, ips, lookupErr, herr)
		}
		if net.ParseIP(c) != nil || want.IsValid() {
			t.Fatalf("CanonicalHost(%q) = %q is a name, but parses as an address", host, c)
		}
		if _, ok := parseInetAton(c); ok {
			t.Fatalf("CanonicalHost(%q) = %q is a name, but inet_aton reads it as an address", host, c)
		}
	})
}

// FuzzReverseName: a reverse name an agent registers, and any host a dialer asks
// for. A valid name is one DNS label that canonicalises to itself under the zone,
// in any case and with a trailing dot; a host is routed to a reverse name only
// when its canonical form is exactly that name under the zone.
func FuzzReverseName(f *testing.F) {
	const zone = "rev.tp.internal"
	for _, s := range [][2]string{
		{"laptop-ssh", "laptop-ssh.rev.tp.internal"},
		{"a", "A.REV.TP.INTERNAL."},
		{"-a", "x.y.rev.tp.internal"},
		{"a-", "rev.tp.internal"},
		{strings.Repeat("a", 63), ".rev.tp.internal"},
		{strings.Repeat("a", 64), "a.rev.tp.internal.evil"},
		{"UPPER", "x_y.rev.tp.internal"},
		{"a.b", "127.0.0.1"},
		{"", "a%b.rev.tp.internal"},
	} {
		f.Add(s[0], s[1])
	}
	reg := newReverseRegistry(ReverseOptions{Zone: zone + "."}, reverse.Hooks{})
	f.Fuzz(func(t *testing.T, name, host string) {
		if err := wire.ValidReverseName(name); err == nil {
			if len(name) < 1 || len(name) > 63 || strings.Trim(name, "abcdefghijklmnopqrstuvwxyz0123456789-") != "" ||
				name[0] == '-' || name[len(name)-1] == '-' {
				t.Fatalf("ValidReverseName accepted %q", name)
			}
			full := name + "." + zone
			for _, spelling := range []string{full, strings.ToUpper(full), full + "."} {
				c, err := CanonicalHost(spelling)
				if err != nil || c != full {
					t.Fatalf("dialing %q reaches %q, %v; want %q", spelling, c, err, full)
				}
				if label, ok := reg.Name(c); !ok || label != name {
					t.Fatalf("%q is routed to reverse name %q, %v; want %q", spelling, label, ok, name)
				}
			}
		}
		if wire.ValidHost(host) != nil {
			return
		}
		c := canonicalHost(host) // as the session does
		label, ok := reg.Name(c)
		if ok && (c != label+"."+zone || strings.Contains(label, ".") || label == "") {
			t.Fatalf("host %q (canonical %q) is routed to reverse name %q", host, c, label)
		}
		if ok && !reg.InZone(c) {
			t.Fatalf("host %q (canonical %q) is routed to a reverse name outside the zone", host, c)
		}
		if !reg.InZone(c) && strings.HasSuffix(c, "."+zone) {
			t.Fatalf("host %q (canonical %q) under the zone is not seen as in it", host, c)
		}
	})
}
