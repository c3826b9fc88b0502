package wire

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net/netip"
	"slices"
	"testing"

	"github.com/quic-go/quic-go/quicvarint"
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
	f.Add(AppendIPSegment(nil, []byte{0x45, 0, 0, 60}, 1240))
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
				_ = OnStream(p)
			}
			if seg, size, ok := ParseIPSegment(c.Payload); ok {
				again, err := ReadIPCapsule(bufio.NewReader(bytes.NewReader(AppendIPSegment(nil, seg, size))))
				if err != nil {
					t.Fatal(err)
				}
				if seg2, size2, ok := ParseIPSegment(again.Payload); !ok || size2 != size || !bytes.Equal(seg2, seg) || again.Type != IPCapsuleTCPSegment {
					t.Fatalf("a TCP_SEGMENT capsule does not round-trip: size %d → %d", size, size2)
				}
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

// Which packets ride the request stream when both ends agreed to
// StreamTCPHeader: TCP segments with data, SYN, FIN or RST; not pure
// acknowledgements, other protocols, IPv4 fragments, IPv6 packets whose first
// header is an extension header, or a TCP header cut short.
func TestOnStream(t *testing.T) {
	v4 := func(proto byte, frag uint16, l4 []byte) []byte {
		p := make([]byte, 20, 20+len(l4))
		p[0], p[9] = 0x45, proto
		binary.BigEndian.PutUint16(p[2:], uint16(20+len(l4)))
		binary.BigEndian.PutUint16(p[6:], frag)
		copy(p[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
		return append(p, l4...)
	}
	v6 := func(next byte, l4 []byte) []byte {
		p := make([]byte, 40, 40+len(l4))
		p[0], p[6] = 0x60, next
		binary.BigEndian.PutUint16(p[4:], uint16(len(l4)))
		p[23], p[39] = 1, 2
		return append(p, l4...)
	}
	tcp := func(flags byte, payload int) []byte {
		h := make([]byte, 32+payload) // 12 bytes of options
		h[12], h[13] = 8<<4, flags
		return h
	}
	const ack, psh, syn, fin, rst = 0x10, 0x08, 0x02, 0x01, 0x04
	for _, c := range []struct {
		name string
		pkt  []byte
		want bool
	}{
		{"IPv4 TCP data", v4(ProtoTCP, 0, tcp(ack|psh, 1200)), true},
		{"IPv4 one byte of data", v4(ProtoTCP, 0, tcp(ack, 1)), true},
		{"IPv4 pure acknowledgement with options", v4(ProtoTCP, 0, tcp(ack, 0)), false},
		{"IPv4 SYN", v4(ProtoTCP, 0, tcp(syn, 0)), true},
		{"IPv4 FIN without data", v4(ProtoTCP, 0, tcp(fin|ack, 0)), true},
		{"IPv4 RST", v4(ProtoTCP, 0, tcp(rst, 0)), true},
		{"IPv4 UDP", v4(ProtoUDP, 0, make([]byte, 100)), false},
		{"IPv4 ICMP", v4(ProtoICMP, 0, make([]byte, 64)), false},
		{"IPv4 first fragment of TCP", v4(ProtoTCP, 0x2000, tcp(ack, 100)), false},
		{"IPv4 later fragment of TCP", v4(ProtoTCP, 0x0010, tcp(ack, 100)), false},
		{"IPv4 TCP header cut short", v4(ProtoTCP, 0, make([]byte, 19)), false},
		{"IPv6 TCP data", v6(ProtoTCP, tcp(ack, 1000)), true},
		{"IPv6 pure acknowledgement", v6(ProtoTCP, tcp(ack, 0)), false},
		{"IPv6 hop-by-hop header before TCP", v6(0, append(make([]byte, 8), tcp(ack, 100)...)), false},
		{"IPv6 UDP", v6(ProtoUDP, make([]byte, 50)), false},
	} {
		if _, err := ParseIPHeader(c.pkt); err != nil {
			t.Fatalf("%s: the test's packet is malformed: %v", c.name, err)
		}
		if got := OnStream(c.pkt); got != c.want {
			t.Errorf("%s: OnStream = %v, want %v", c.name, got, c.want)
		}
	}
}

// NextIPCapsule reads what ReadIPCapsule reads: capsules that fit the
// reader's buffer (their payload lies in it), one larger than the buffer
// (copied out), and the bad inputs: a payload cut short, a length cut short,
// and a capsule longer than MaxIPCapsule.
func TestNextIPCapsule(t *testing.T) {
	small := bytes.Repeat([]byte{7}, 1300)
	big := bytes.Repeat([]byte{9}, 5000)
	data := AppendIPCapsule(nil, IPCapsuleDatagram, small)
	data = AppendIPCapsule(data, IPCapsuleRouteAdvertisement, big)
	data = AppendIPCapsule(data, IPCapsuleDatagram, small[:1])
	r := bufio.NewReaderSize(bytes.NewReader(data), 4096)
	for i, want := range [][]byte{small, big, small[:1]} {
		c, err := NextIPCapsule(r)
		if err != nil || !bytes.Equal(c.Payload, want) {
			t.Fatalf("capsule %d: %d bytes, %v; want %d bytes", i, len(c.Payload), err, len(want))
		}
	}
	if _, err := NextIPCapsule(r); err != io.EOF {
		t.Fatalf("after the last capsule: %v, want io.EOF", err)
	}
	whole := AppendIPCapsule(nil, IPCapsuleDatagram, small)
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"a payload cut short", whole[:len(whole)-1]},
		{"a length cut short", whole[:2]},
		{"a capsule longer than MaxIPCapsule", quicvarint.Append(quicvarint.Append(nil, IPCapsuleDatagram), MaxIPCapsule+1)},
	} {
		_, err := NextIPCapsule(bufio.NewReader(bytes.NewReader(tc.data)))
		if err == nil || err == io.EOF {
			t.Errorf("%s: err = %v, want an error other than io.EOF", tc.name, err)
		}
	}
}
