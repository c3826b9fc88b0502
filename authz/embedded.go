package authz

import "net/netip"

var (
	nat64Prefix = netip.MustParsePrefix("64:ff9b::/96")
	sixToFour   = netip.MustParsePrefix("2002::/16")
)

// EmbeddedIPv4 returns the IPv4 address that an IPv6 address carries to, for the
// translation schemes that reach IPv4 hosts: IPv4-mapped (::ffff:0:0/96), NAT64's
// well-known prefix (64:ff9b::/96, RFC 6052: the last 32 bits) and 6to4
// (2002::/16, RFC 3056: bits 16 to 47). Such an address must be judged by the
// IPv4 address inside it: 64:ff9b::a9fe:a9fe reaches 169.254.169.254 through a
// NAT64 gateway.
func EmbeddedIPv4(ip netip.Addr) (netip.Addr, bool) {
	if ip.Is4In6() {
		return ip.Unmap(), true
	}
	if !ip.Is6() {
		return netip.Addr{}, false
	}
	b := ip.As16()
	switch {
	case nat64Prefix.Contains(ip):
		return netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]}), true
	case sixToFour.Contains(ip):
		return netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]}), true
	}
	return netip.Addr{}, false
}
