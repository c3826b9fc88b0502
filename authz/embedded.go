package authz

import "net/netip"

var (
	siitPrefix     = netip.MustParsePrefix("::ffff:0:0:0/96")
	nat64Prefix    = netip.MustParsePrefix("64:ff9b::/96")
	nat64Local     = netip.MustParsePrefix("64:ff9b:1::/48")
	sixToFour      = netip.MustParsePrefix("2002::/16")
	teredoPrefix   = netip.MustParsePrefix("2001::/32")
	ipv4Compatible = netip.MustParsePrefix("::/96")
)

// EmbeddedIPv4 returns the IPv4 address that an IPv6 address carries to, for every
// scheme that reaches IPv4 hosts through an IPv6 address:
//
//   - IPv4-mapped, ::ffff:0:0/96: the last 32 bits;
//   - SIIT's IPv4-translated, ::ffff:0:0:0/96 (RFC 2765): the last 32 bits;
//   - NAT64's well-known prefix 64:ff9b::/96 (RFC 6052): the last 32 bits;
//   - NAT64's local-use prefix 64:ff9b:1::/48 (RFC 8215): the last 32 bits, the
//     /96 layout (a network that uses a shorter prefix inside the /48 places the
//     address elsewhere, which is why the default policy refuses the whole /48);
//   - 6to4, 2002::/16 (RFC 3056): bits 16 to 47;
//   - Teredo, 2001::/32 (RFC 4380): the client's address, bits 96 to 127 with
//     every bit inverted (the server's address in bits 32 to 63 is only a relay);
//   - IPv4-compatible, ::/96 (RFC 4291, deprecated): the last 32 bits, except for
//     :: and ::1, which are the unspecified and loopback addresses.
//
// Such an address must be judged by the IPv4 address inside it:
// 64:ff9b::a9fe:a9fe reaches 169.254.169.254 through a NAT64 gateway.
func EmbeddedIPv4(ip netip.Addr) (netip.Addr, bool) {
	if ip.Is4In6() {
		return ip.Unmap(), true
	}
	if !ip.Is6() {
		return netip.Addr{}, false
	}
	ip = ip.WithZone("")
	b := ip.As16()
	last := netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
	switch {
	case siitPrefix.Contains(ip), nat64Prefix.Contains(ip), nat64Local.Contains(ip):
		return last, true
	case sixToFour.Contains(ip):
		return netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]}), true
	case teredoPrefix.Contains(ip):
		return netip.AddrFrom4([4]byte{^b[12], ^b[13], ^b[14], ^b[15]}), true
	case ipv4Compatible.Contains(ip) && !ip.IsUnspecified() && !ip.IsLoopback():
		return last, true
	}
	return netip.Addr{}, false
}
