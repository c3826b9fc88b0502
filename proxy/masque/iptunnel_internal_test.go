package masque

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/proxy/wire"
)

func grantOf(routes ...string) *authz.IPGrant {
	g := &authz.IPGrant{}
	for _, r := range routes {
		proto := uint8(0)
		if p, ok := bytes.CutSuffix([]byte(r), []byte("/udp")); ok {
			r, proto = string(p), 17
		}
		g.Routes = append(g.Routes, authz.IPRoute{Prefix: netip.MustParsePrefix(r), Protocol: proto})
	}
	return g
}

func route(p string, proto uint8) wire.IPRoute { return wire.RouteOf(netip.MustParsePrefix(p), proto) }

// The routes a tunnel gets are its grant narrowed to the request's scope: a
// target prefix keeps the granted prefixes it overlaps (cut to the target
// when the target is narrower), an ipproto keeps the routes of that protocol
// or of any; overlapping prefixes merge; IPv4 comes first.
func TestRoutesOfScope(t *testing.T) {
	grant := grantOf("10.79.0.0/24", "10.77.0.0/24", "fd77::/64/udp")
	for _, tc := range []struct {
		name   string
		g      *authz.IPGrant
		target string // "" is *
		proto  int
		want   []wire.IPRoute
	}{
		{"everything", grant, "", -1, []wire.IPRoute{route("10.77.0.0/24", 0), route("10.79.0.0/24", 0), route("fd77::/64", 17)}},
		{"a target inside one prefix", grant, "10.77.0.128/25", -1, []wire.IPRoute{route("10.77.0.128/25", 0)}},
		{"a target wider than the grant", grant, "10.0.0.0/8", -1, []wire.IPRoute{route("10.77.0.0/24", 0), route("10.79.0.0/24", 0)}},
		{"a target outside the grant", grant, "192.0.2.0/24", -1, nil},
		{"TCP only", grant, "", 6, []wire.IPRoute{route("10.77.0.0/24", 6), route("10.79.0.0/24", 6)}},
		{"UDP only", grant, "", 17, []wire.IPRoute{route("10.77.0.0/24", 17), route("10.79.0.0/24", 17), route("fd77::/64", 17)}},
		{"overlapping prefixes merge", grantOf("10.77.0.0/24", "10.77.0.0/16", "10.77.1.0/24"), "", -1, []wire.IPRoute{route("10.77.0.0/16", 0)}},
	} {
		target := netip.Prefix{}
		if tc.target != "" {
			target = netip.MustParsePrefix(tc.target)
		}
		if got := RoutesOf(tc.g, target, tc.proto); !slices.Equal(got, tc.want) {
			t.Errorf("%s: routes %v, want %v", tc.name, got, tc.want)
		}
	}
}

// A re-check that narrows a live tunnel's grant keeps it: the new routes are
// advertised once, packets to and from the prefixes still granted pass both
// ways, and only the removed prefix is refused; a re-check that grants the
// same again sends nothing, and one that leaves no prefix in the tunnel's
// scope ends it. Bad input: packets to and from the removed prefix.
func TestIPTunnelRegrantNarrows(t *testing.T) {
	for _, tc := range []struct {
		name   string
		target string
		proto  int
	}{{"whole grant", "", -1}, {"scoped to 10.0.0.0/8, UDP", "10.0.0.0/8", 17}} {
		t.Run(tc.name, func(t *testing.T) {
			target := netip.Prefix{}
			if tc.target != "" {
				target = netip.MustParsePrefix(tc.target)
			}
			peer := netip.MustParseAddr("100.96.0.1")
			ctx, end := context.WithCancelCause(context.Background())
			defer end(nil)
			var advertised [][]wire.IPRoute
			tn := &IPTunnel{t: &IPTunnels{}, addrs: []netip.Prefix{netip.PrefixFrom(peer, 32)}, end: end,
				writeCap: func(b []byte) error {
					c, err := wire.ReadIPCapsule(bufio.NewReader(bytes.NewReader(b)))
					if err != nil || c.Type != wire.IPCapsuleRouteAdvertisement {
						t.Fatalf("the tunnel wrote %+v, %v; want a ROUTE_ADVERTISEMENT", c, err)
					}
					rs, err := wire.ParseRoutes(c.Payload)
					if err != nil {
						t.Fatal(err)
					}
					advertised = append(advertised, rs)
					return nil
				}}
			wide := RoutesOf(grantOf("10.77.0.0/24", "10.79.0.0/24"), target, tc.proto)
			tn.routes.Store(&wide)

			narrow := authz.Decision{Allow: true, IP: grantOf("10.77.0.0/24")}
			want := RoutesOf(narrow.IP, target, tc.proto)
			tn.Regrant(narrow, target, tc.proto)
			if ctx.Err() != nil {
				t.Fatalf("a narrower grant ended the tunnel: %v", context.Cause(ctx))
			}
			if len(advertised) != 1 || !slices.Equal(advertised[0], want) {
				t.Fatalf("advertised %v after the change; want once %v", advertised, want)
			}
			kept, removed := netip.MustParseAddr("10.77.0.5"), netip.MustParseAddr("10.79.0.5")
			if d := tn.allowedOut(wire.IPHeader{Src: peer, Dst: kept, Proto: 17}); d != nil {
				t.Fatal("a packet to the prefix still granted was refused")
			}
			if d := tn.allowedOut(wire.IPHeader{Src: peer, Dst: removed, Proto: 17}); d != &tn.t.stats.dropDst {
				t.Fatal("a packet to the removed prefix was let out")
			}
			if !tn.allowedIn(wire.IPHeader{Src: kept, Dst: peer, Proto: 17}, nil) {
				t.Fatal("a packet from the prefix still granted was refused")
			}
			if tn.allowedIn(wire.IPHeader{Src: removed, Dst: peer, Proto: 17}, nil) {
				t.Fatal("a packet from the removed prefix was let in")
			}

			tn.Regrant(narrow, target, tc.proto)
			if len(advertised) != 1 || ctx.Err() != nil {
				t.Fatalf("the same grant again: %d advertisements, tunnel ended %v; want nothing new", len(advertised), context.Cause(ctx))
			}
			// No prefix left in the tunnel's scope: nothing at all, or (for
			// the scoped tunnel) only one outside its target.
			none := grantOf()
			if tc.target != "" {
				none = grantOf("192.0.2.0/24")
			}
			tn.Regrant(authz.Decision{Allow: true, IP: none}, target, tc.proto)
			var re *wire.RevokedError
			if !errors.As(context.Cause(ctx), &re) {
				t.Fatalf("a grant with no prefix in the tunnel's scope: tunnel ended %v; want it revoked", context.Cause(ctx))
			}
		})
	}
}

// A re-check that narrows the grant after the tunnel opened and before its
// stream is attached (the session takes re-checks before the answer goes
// out) writes to no peer yet and is not lost: the first capsules the peer
// gets advertise the routes as the re-check left them. Before, the re-check
// called a tunnel writer that was not set yet. Bad input: a re-check in that
// window.
func TestIPTunnelRegrantBeforeAttach(t *testing.T) {
	peer := netip.MustParseAddr("100.96.0.1")
	ctx, end := context.WithCancelCause(context.Background())
	defer end(nil)
	tn := &IPTunnel{t: &IPTunnels{}, addrs: []netip.Prefix{netip.PrefixFrom(peer, 32)}, end: end}
	wide := RoutesOf(grantOf("10.77.0.0/24", "10.79.0.0/24"), netip.Prefix{}, -1)
	tn.routes.Store(&wide)

	narrow := authz.Decision{Allow: true, IP: grantOf("10.77.0.0/24")}
	tn.Regrant(narrow, netip.Prefix{}, -1)
	if ctx.Err() != nil {
		t.Fatalf("a narrower grant before the stream was attached ended the tunnel: %v", context.Cause(ctx))
	}
	var sent []byte
	tn.Attach(func(b []byte) error { sent = append(sent, b...); return nil }, nil, 0)
	if err := tn.Announce(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(bytes.NewReader(sent))
	var advertised [][]wire.IPRoute
	for {
		c, err := wire.ReadIPCapsule(r)
		if err != nil {
			break
		}
		if c.Type == wire.IPCapsuleRouteAdvertisement {
			rs, err := wire.ParseRoutes(c.Payload)
			if err != nil {
				t.Fatal(err)
			}
			advertised = append(advertised, rs)
		}
	}
	want := RoutesOf(narrow.IP, netip.Prefix{}, -1)
	if len(advertised) != 1 || !slices.Equal(advertised[0], want) {
		t.Fatalf("the peer was advertised %v; want once the re-checked %v", advertised, want)
	}
}
