package tpd

import (
	"encoding/binary"
	"net/netip"
	"syscall"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Quoted packets' UDP source ports: what each ICMP error is about.
const (
	quotesOwn       = 50000 // the tunnel's own packet to a granted destination
	quotesOtherPeer = 50001 // another peer's packet
	quotesDenied    = 50002 // the tunnel's own address, to a destination outside its grant
	plainOutside    = 50003 // not an ICMP error: a UDP packet from outside the grant
)

// icmpError is an ICMP (IPv4) or ICMPv6 "port unreachable" from router to
// dst that quotes the packet quoted.
func icmpError(router, dst netip.Addr, quoted []byte) []byte {
	m := make([]byte, 8+len(quoted))
	copy(m[8:], quoted)
	if router.Is4() {
		m[0], m[1] = 3, 3
		binary.BigEndian.PutUint16(m[2:], inetChecksum(m))
		return ipv4(router, dst, wire.ProtoICMP, m)
	}
	m[0], m[1] = 1, 4
	pseudo := append(append(append([]byte{}, router.AsSlice()...), dst.AsSlice()...), 0, 0, 0, 0, 0, 0, 0, wire.ProtoICMPv6)
	binary.BigEndian.PutUint32(pseudo[32:], uint32(len(m)))
	binary.BigEndian.PutUint16(m[2:], inetChecksum(append(pseudo, m...)))
	p := make([]byte, 40, 40+len(m))
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:], uint16(len(m)))
	p[6], p[7] = wire.ProtoICMPv6, 64
	copy(p[8:24], router.AsSlice())
	copy(p[24:40], dst.AsSlice())
	return append(p, m...)
}

// udpTo builds a UDP packet of either family.
func udpTo(src, dst netip.AddrPort, data []byte) []byte {
	if src.Addr().Is4() {
		return udp4(src, dst, data)
	}
	return udp6(src, dst, data)
}

// rawSend sends a whole IP packet from this namespace as it is (a raw socket
// that includes the header), so the kernel routes it like any other: to a
// peer's address, out through its tunnel's tun device.
func rawSend(t *testing.T, pkt []byte) {
	t.Helper()
	dst, _ := wire.ParseIPHeader(pkt)
	family, sa := syscall.AF_INET6, syscall.Sockaddr(&syscall.SockaddrInet6{Addr: dst.Dst.As16()})
	if dst.Dst.Is4() {
		family, sa = syscall.AF_INET, &syscall.SockaddrInet4{Addr: dst.Dst.As4()}
	}
	fd, err := syscall.Socket(family, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
	if err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	defer syscall.Close(fd)
	if err := syscall.Sendto(fd, pkt, 0, sa); err != nil {
		t.Fatalf("sending a raw packet to %s: %v", dst.Dst, err)
	}
}

// quotedPort reads, from a packet a peer received, which packet an ICMP error
// of router quotes (its UDP source port); ok is false for anything else.
func quotedPort(p []byte, router netip.Addr) (port uint16, ok bool) {
	h, err := wire.ParseIPHeader(p)
	if err != nil || h.Src != router {
		return 0, false
	}
	if h.Proto == 17 { // a plain UDP packet from the router's address
		ihl := int(p[0]&0x0f) * 4
		if router.Is6() {
			ihl = 40
		}
		return binary.BigEndian.Uint16(p[ihl:]), len(p) >= ihl+8
	}
	off := 20 + 8 + 20 // IPv4, ICMP, the quoted IPv4 header
	if router.Is6() {
		off = 40 + 8 + 40
	}
	if len(p) < off+2 || (h.Proto != wire.ProtoICMP && h.Proto != wire.ProtoICMPv6) {
		return 0, false
	}
	return binary.BigEndian.Uint16(p[off:]), true
}

// An ICMP error from outside a peer's grant (a router's) reaches the peer only
// when the packet it quotes is one that peer sent to a granted destination.
// Bad input, from 10.78.0.1 and fd78::1 (never granted), to alice's
// addresses: errors quoting bob's packet, errors quoting alice's packet to a
// destination outside her grant, a plain UDP packet; to bob's: an error
// quoting alice's packet. Each is dropped and counted as inbound, and the
// error that quotes the peer's own packet, sent after them, is the first of
// the router's packets each peer receives.
func TestIPTunnelICMPErrorOnlyForOwnPackets(t *testing.T) {
	if !testnet.InNetns(t) {
		return
	}
	mustIP(t, "addr", "add", "fd77::1/128", "dev", "lo", "nodad")
	mustIP(t, "addr", "add", "fd78::1/128", "dev", "lo", "nodad")
	r := newIPRigPolicy(t, ipPolicy6)
	alice := r.dialRaw(t, r.cert)
	bob := r.dialRaw(t, enrollCert(t, r.connectRig, "bob", "desk"))
	for _, fam := range []struct {
		name                   string
		router, granted, other netip.Addr
		alice, bob             netip.Addr
	}{
		{"IPv4", netip.MustParseAddr("10.78.0.1"), netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.78.0.9"), alice.v4(), bob.v4()},
		{"IPv6", netip.MustParseAddr("fd78::1"), netip.MustParseAddr("fd77::1"), netip.MustParseAddr("fd78::9"), alice.v6(), bob.v6()},
	} {
		t.Run(fam.name, func(t *testing.T) {
			quote := func(src netip.Addr, port uint16, dst netip.Addr) []byte {
				return udpTo(netip.AddrPortFrom(src, port), netip.AddrPortFrom(dst, 53), []byte("quoted"))
			}
			before := r.d.proxy.IPTunnels().Stats().DroppedInbound
			bad := [][]byte{
				icmpError(fam.router, fam.alice, quote(fam.bob, quotesOtherPeer, fam.granted)),
				icmpError(fam.router, fam.alice, quote(fam.alice, quotesDenied, fam.other)),
				udpTo(netip.AddrPortFrom(fam.router, plainOutside), netip.AddrPortFrom(fam.alice, 9), []byte("outside")),
				icmpError(fam.router, fam.bob, quote(fam.alice, quotesOtherPeer, fam.granted)),
			}
			for _, p := range bad {
				rawSend(t, p)
			}
			// Then the errors each peer should get. A tun device hands its
			// packets over in order: each peer reads the bad ones (if they
			// got through) before its good one.
			rawSend(t, icmpError(fam.router, fam.alice, quote(fam.alice, quotesOwn, fam.granted)))
			rawSend(t, icmpError(fam.router, fam.bob, quote(fam.bob, quotesOwn, fam.granted)))
			for _, peer := range []struct {
				name string
				c    *rawIP
			}{{"alice", alice}, {"bob", bob}} {
				buf := make([]byte, 2000)
				for {
					n, err := peer.c.ReadPacket(buf)
					if err != nil {
						t.Fatalf("%s: waiting for the ICMP error about its own packet: %v", peer.name, err)
					}
					port, ok := quotedPort(buf[:n], fam.router)
					if !ok {
						continue
					}
					if port != quotesOwn {
						t.Fatalf("%s received the router's packet marked %d (%d: another peer's packet quoted, %d: a packet to a destination outside the grant, %d: not an ICMP error); want only the error about its own packet",
							peer.name, port, quotesOtherPeer, quotesDenied, plainOutside)
					}
					break
				}
			}
			if d := r.d.proxy.IPTunnels().Stats().DroppedInbound - before; d < int64(len(bad)) {
				t.Fatalf("inbound drops counted: %d; want at least the %d packets refused", d, len(bad))
			}
		})
	}
}
