package tun

import (
	"encoding/binary"
	"strings"
	"testing"
)

// segmentOf builds an IPv4 (or IPv6) TCP segment with data bytes of payload
// and the given flags; checksums are not filled in (the receiving kernel
// computes every packet's).
func segmentOf(v6 bool, flags byte, data int) []byte {
	iphl := 20
	if v6 {
		iphl = 40
	}
	seg := make([]byte, iphl+20+data)
	if v6 {
		seg[0], seg[6], seg[7] = 0x60, ipProtoTCP, 64
		binary.BigEndian.PutUint16(seg[4:], uint16(len(seg)-40))
	} else {
		seg[0], seg[8], seg[9] = 0x45, 64, ipProtoTCP
		binary.BigEndian.PutUint16(seg[2:], uint16(len(seg)))
	}
	seg[iphl+12], seg[iphl+13] = 5<<4, flags
	return seg
}

func TestCheckSegment(t *testing.T) {
	good := []struct {
		name    string
		seg     []byte
		size    int
		packets int
	}{
		{"IPv4, 52 packets of 1,240", segmentOf(false, tcpFlagACK|tcpFlagPSH, 52*1240), 1240, 52},
		{"IPv6, a shorter last packet", segmentOf(true, tcpFlagACK, 10*1220+7), 1220, 11},
		{"a FIN on the last packet", segmentOf(false, tcpFlagACK|tcpFlagFIN, 3000), 1240, 3},
		{"64 packets of 1,000", segmentOf(false, tcpFlagACK, 64*1000), 1000, 64},
	}
	for _, c := range good {
		n, err := CheckSegment(c.seg, c.size)
		if err != nil || n != c.packets {
			t.Errorf("%s: %d packets, %v; want %d", c.name, n, err, c.packets)
		}
	}
	if h := SegmentHeaderLen(segmentOf(true, tcpFlagACK, 100)); h != 60 {
		t.Errorf("SegmentHeaderLen of an IPv6 segment: %d, want 60", h)
	}

	bad := []struct {
		name, want string
		seg        []byte
		size       int
	}{
		{"no segment size", "segment size of 0", segmentOf(false, tcpFlagACK, 5000), 0},
		{"a negative segment size", "segment size of -1", segmentOf(false, tcpFlagACK, 5000), -1},
		{"a segment size of 47 (below any TCP's MSS)", "less than 64", segmentOf(false, tcpFlagACK, 47*40), 47},
		{"one packet", "one packet, not a segment", segmentOf(false, tcpFlagACK, 1240), 1240},
		{"a segment size of 65,535 (the kernel's GSO_BY_FRAGS)", "one packet", segmentOf(false, tcpFlagACK, 5000), 65535},
		{"65 packets of 1,000 bytes (a peer's amplification)", "more than 64", segmentOf(false, tcpFlagACK, 65*1000), 1000},
		{"a SYN", "TCP flags", segmentOf(false, tcpFlagACK|tcpFlagSYN, 5000), 1240},
		{"no ACK", "TCP flags", segmentOf(false, tcpFlagPSH, 5000), 1240},
		{"no data", "leaves no data", segmentOf(false, tcpFlagACK, 0), 1240},
		{"IPv4 options", "neither IPv4 without options", func() []byte { b := segmentOf(false, tcpFlagACK, 5000); b[0] = 0x46; return b }(), 1240},
		{"an IPv4 fragment", "fragment", func() []byte { b := segmentOf(false, tcpFlagACK, 5000); b[6] = 0x20; return b }(), 1240},
		{"UDP", "not TCP", func() []byte { b := segmentOf(false, tcpFlagACK, 5000); b[9] = 17; return b }(), 1240},
		{"an IPv4 length that lies", "length says", func() []byte {
			b := segmentOf(false, tcpFlagACK, 5000)
			binary.BigEndian.PutUint16(b[2:], 1500)
			return b
		}(), 1240},
		{"an IPv6 extension header", "next header is 0", func() []byte { b := segmentOf(true, tcpFlagACK, 5000); b[6] = 0; return b }(), 1220},
		{"a TCP header longer than the segment", "leaves no data", func() []byte { b := segmentOf(false, tcpFlagACK, 20); b[32] = 15 << 4; return b }(), 1240},
		{"a TCP header length under 20", "TCP header of 16", func() []byte { b := segmentOf(false, tcpFlagACK, 5000); b[32] = 4 << 4; return b }(), 1240},
		{"too short for a header", "neither", make([]byte, 30), 1240},
	}
	for _, c := range bad {
		if n, err := CheckSegment(c.seg, c.size); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %d packets, %v; want an error saying %q", c.name, n, err, c.want)
		}
	}
}

// Whatever a peer sends as a segment, CheckSegment answers without a panic,
// and what it accepts holds its headers and data within its length.
func FuzzCheckSegment(f *testing.F) {
	f.Add(segmentOf(false, tcpFlagACK|tcpFlagPSH, 3000), 1240)
	f.Add(segmentOf(true, tcpFlagACK, 3000), 1220)
	f.Add([]byte{0x45, 0, 0, 40}, 1)
	f.Add(segmentOf(false, tcpFlagACK, 128), 64)
	f.Fuzz(func(t *testing.T, seg []byte, size int) {
		n, err := CheckSegment(seg, size)
		if err != nil {
			return
		}
		if h := SegmentHeaderLen(seg); h >= len(seg) || n < 2 || n > MaxSegmentPackets || size < MinSegmentSize {
			t.Fatalf("accepted a segment of %d bytes with headers of %d making %d packets", len(seg), h, n)
		}
		if got := SegmentPackets(seg, size); got != n {
			t.Fatalf("SegmentPackets = %d for a segment CheckSegment counts as %d packets", got, n)
		}
		h, data := SegmentHeaderLen(seg), len(seg)-SegmentHeaderLen(seg)
		if got, want := SegmentWireBytes(seg, n), data+n*h; got != want {
			t.Fatalf("SegmentWireBytes = %d; %d bytes of data in %d packets of %d bytes of headers are %d", got, data, n, h, want)
		}
	})
}
