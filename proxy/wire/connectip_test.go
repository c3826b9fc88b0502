package wire

import (
	"bufio"
	"bytes"
	"net/netip"
	"slices"
	"testing"
)

func TestIPCapsulesRoundTrip(t *testing.T) {
	addrs := []AssignedAddress{{RequestID: 0, Prefix: netip.MustParsePrefix("100.96.0.1/32")},
		{RequestID: 7, Prefix: netip.MustParsePrefix("fd74:7000::1/128")}}
	routes := []IPRoute{RouteOf(netip.MustParsePrefix("10.0.0.0/8"), 0), RouteOf(netip.MustParsePrefix("192.168.1.0/24"), 0),
		RouteOf(netip.MustParsePrefix("10.1.0.0/16"), ProtoTCP), RouteOf(netip.MustParsePrefix("2001:db8::/32"), 0)}
	var b []byte
	b = AppendAddresses(b, IPCapsuleAddressAssign, addrs)
	b = AppendRoutes(b, routes)
	b = AppendIPCapsule(b, IPCapsuleDatagram, AppendIPDatagram(nil, []byte{0x45}))
	r := bufio.NewReader(bytes.NewReader(b))
	c, err := ReadIPCapsule(r)
	if err != nil || c.Type != IPCapsuleAddressAssign {
		t.Fatalf("%+v %v", c, err)
	}
	if got, err := ParseAddresses(c.Payload); err != nil || !slices.Equal(got, addrs) {
		t.Fatalf("addresses %v %v, want %v", got, err, addrs)
	}
	c, _ = ReadIPCapsule(r)
	if got, err := ParseRoutes(c.Payload); err != nil || !slices.Equal(got, routes) {
		t.Fatalf("routes %v %v, want %v", got, err, routes)
	}
	c, _ = ReadIPCapsule(r)
	if p, ok := ParseIPDatagram(c.Payload); !ok || !bytes.Equal(p, []byte{0x45}) {
		t.Fatalf("datagram %x %v", p, ok)
	}
	if r := RouteOf(netip.MustParsePrefix("10.1.0.0/16"), 0); r.End != netip.MustParseAddr("10.1.255.255") {
		t.Fatalf("RouteOf: %v", r)
	}
}

// Bad input: each is refused with an error, never accepted or a panic.
func TestIPCapsulesRefuseBadInput(t *testing.T) {
	for name, payload := range map[string][]byte{
		"IP version 5":            {0, 5, 1, 2, 3, 4, 32},
		"prefix length 33":        {0, 4, 10, 0, 0, 1, 33},
		"host bits beyond prefix": {0, 4, 10, 0, 0, 1, 24},
		"truncated address":       {0, 4, 10, 0},
	} {
		if _, err := ParseAddresses(payload); err == nil {
			t.Errorf("ParseAddresses accepted %s", name)
		}
	}
	overlap := AppendRoutes(nil, []IPRoute{RouteOf(netip.MustParsePrefix("10.0.0.0/8"), 0), RouteOf(netip.MustParsePrefix("10.1.0.0/16"), 0)})
	c, _ := ReadIPCapsule(bufio.NewReader(bytes.NewReader(overlap)))
	if _, err := ParseRoutes(c.Payload); err == nil {
		t.Error("ParseRoutes accepted overlapping ranges of one protocol")
	}
	v6first := AppendRoutes(nil, []IPRoute{RouteOf(netip.MustParsePrefix("2001:db8::/32"), 0), RouteOf(netip.MustParsePrefix("10.0.0.0/8"), 0)})
	c, _ = ReadIPCapsule(bufio.NewReader(bytes.NewReader(v6first)))
	if _, err := ParseRoutes(c.Payload); err == nil {
		t.Error("ParseRoutes accepted IPv6 before IPv4")
	}
	huge := AppendIPCapsule(nil, 9, nil)[:1]
	huge = append(huge, 0xbf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff) // length 2^62-1
	if _, err := ReadIPCapsule(bufio.NewReader(bytes.NewReader(huge))); err == nil {
		t.Error("ReadIPCapsule accepted a capsule longer than MaxIPCapsule")
	}
	if _, err := ParseIPHeader([]byte{0x45, 0, 0, 99, 0, 0, 0, 0, 64, 17, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}); err == nil {
		t.Error("ParseIPHeader accepted an IPv4 packet whose total length is not its size")
	}
	if _, ok := ParseIPDatagram([]byte{1, 0x45}); ok {
		t.Error("ParseIPDatagram accepted context ID 1")
	}
}

func TestPacketTooBig(t *testing.T) {
	pkt := make([]byte, 1400)
	pkt[0], pkt[2], pkt[3], pkt[9] = 0x45, 1400>>8, 1400&0xff, ProtoUDP
	copy(pkt[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	icmp := PacketTooBig(pkt, 1300)
	h, err := ParseIPHeader(icmp)
	if err != nil || h.Src != netip.MustParseAddr("10.0.0.2") || h.Dst != netip.MustParseAddr("10.0.0.1") || h.Proto != ProtoICMP {
		t.Fatalf("%+v %v", h, err)
	}
	if checksum(icmp[:20], 0) != 0 || checksum(icmp[20:], 0) != 0 || icmp[20] != 3 || icmp[21] != 4 || len(icmp) > 576 {
		t.Fatalf("ICMP fragmentation needed is malformed: % x", icmp[:28])
	}
}

func FuzzIPCapsules(f *testing.F) {
	f.Add(AppendAddresses(nil, IPCapsuleAddressAssign, []AssignedAddress{{Prefix: netip.MustParsePrefix("100.96.0.1/32")}}))
	f.Add(AppendRoutes(nil, []IPRoute{RouteOf(netip.MustParsePrefix("10.0.0.0/8"), 6)}))
	f.Add([]byte{0, 3, 0, 0x45, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bufio.NewReader(bytes.NewReader(b))
		for {
			c, err := ReadIPCapsule(r)
			if err != nil {
				return
			}
			if as, err := ParseAddresses(c.Payload); err == nil {
				again, err := ReadIPCapsule(bufio.NewReader(bytes.NewReader(AppendAddresses(nil, 1, as))))
				if err != nil {
					t.Fatal(err)
				}
				if got, err := ParseAddresses(again.Payload); err != nil || !slices.Equal(got, as) {
					t.Fatalf("addresses do not round-trip: %v → %v, %v", as, got, err)
				}
			}
			if rs, err := ParseRoutes(c.Payload); err == nil && ValidateRoutes(rs) != nil {
				t.Fatal("ParseRoutes returned routes ValidateRoutes refuses")
			}
			if p, ok := ParseIPDatagram(c.Payload); ok {
				if h, err := ParseIPHeader(p); err == nil && (!h.Src.IsValid() || !h.Dst.IsValid()) {
					t.Fatal("ParseIPHeader returned invalid addresses")
				}
				_ = PacketTooBig(p, 1280)
			}
		}
	})
}

// A reader that gathers packets flushes them before a read that may wait:
// CapsuleBuffered says whether the next capsule is whole in the buffer. The
// bad inputs: a capsule cut in its payload, in its length, before its
// length, and an empty buffer.
func TestCapsuleBuffered(t *testing.T) {
	two := AppendIPCapsule(AppendIPCapsule(nil, IPCapsuleDatagram, make([]byte, 300)), IPCapsuleDatagram, []byte{0, 1})
	first := len(AppendIPCapsule(nil, IPCapsuleDatagram, make([]byte, 300)))
	for _, tc := range []struct {
		name string
		data []byte
		want bool
	}{
		{"two whole capsules", two, true},
		{"one whole capsule", two[:first], true},
		{"cut in the payload", two[:first-1], false},
		{"cut in the length (a two-byte varint)", two[:2], false},
		{"only the type", two[:1], false},
		{"nothing", nil, false},
	} {
		r := bufio.NewReader(bytes.NewReader(tc.data))
		_, _ = r.Peek(len(tc.data)) // fill the buffer as a read would
		if got := CapsuleBuffered(r); got != tc.want {
			t.Errorf("%s: CapsuleBuffered = %v, want %v", tc.name, got, tc.want)
		}
	}
}
