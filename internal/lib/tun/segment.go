package tun

import (
	"encoding/binary"
	"fmt"
)

// Segments whole: where both ends of a tunnel agree, a TCP segment of up to
// 64 KiB crosses the tunnel as it left the kernel, with the payload size of
// its packets (the segment size), and is written whole to the other end's
// device, which cuts it into packets. Neither end splits, joins or
// checksums packets (Reader.ReadSegment, Writer.WriteSegment; docs/IP.md,
// "Segments whole").

const (
	tcpFlagFIN       = 0x01
	tcpFlagSYN       = 0x02
	tcpFlagPSH       = 0x08
	tcpFlagACK       = 0x10
	ipProtoTCP       = 6
	maxSegmentLength = 65535
)

// MaxSegmentPackets bounds the packets a segment may make: a peer's
// segment of 64 KiB in packets of one byte would otherwise cost the
// receiving kernel 65,000 packets for one write. The kernel's own segments
// on a device Up set up hold at most BatchFor(mtu)-1 (53 at an MTU of 1280).
// MinSegmentSize is the smallest segment size taken: Linux's TCP sends no
// smaller (tcp_min_snd_mss is 48), and some network cards' segmentation
// hangs on a tiny one where a forwarded segment reaches them whole.
const (
	MaxSegmentPackets = 64
	MinSegmentSize    = 64
)

// CheckSegment reports how many packets seg makes when cut into packets of
// size bytes of TCP payload each (the last one may be shorter), or why it is
// not a segment TP carries whole: IPv4 without options and not a fragment,
// or IPv6 whose first next header is TCP; the IP length field matching the
// segment's length; a whole TCP header; data; flags ACK, with PSH and FIN
// allowed beside it and nothing else (a SYN, RST, URG or CWR travels as a
// packet); a segment size of at least MinSegmentSize; at least 2 packets
// (one is a packet, not a segment) and at most MaxSegmentPackets. A segment from a peer is
// checked before it is written; a segment from the kernel that fails is
// split into packets instead.
func CheckSegment(seg []byte, size int) (packets int, err error) {
	var iphl int
	switch {
	case len(seg) >= 40 && seg[0] == 0x45:
		if int(binary.BigEndian.Uint16(seg[2:])) != len(seg) {
			return 0, fmt.Errorf("a segment of %d bytes whose IPv4 length says %d", len(seg), binary.BigEndian.Uint16(seg[2:]))
		}
		if seg[9] != ipProtoTCP || binary.BigEndian.Uint16(seg[6:])&0x3fff != 0 {
			return 0, fmt.Errorf("a segment that is not TCP (protocol %d) or is an IPv4 fragment", seg[9])
		}
		iphl = 20
	case len(seg) >= 60 && seg[0]>>4 == 6:
		if int(binary.BigEndian.Uint16(seg[4:]))+40 != len(seg) {
			return 0, fmt.Errorf("a segment of %d bytes whose IPv6 payload length says %d", len(seg), binary.BigEndian.Uint16(seg[4:]))
		}
		if seg[6] != ipProtoTCP {
			return 0, fmt.Errorf("a segment whose IPv6 next header is %d, not TCP", seg[6])
		}
		iphl = 40
	default:
		return 0, fmt.Errorf("a segment of %d bytes that is neither IPv4 without options nor IPv6", len(seg))
	}
	if len(seg) > maxSegmentLength {
		return 0, fmt.Errorf("a segment of %d bytes, more than %d", len(seg), maxSegmentLength)
	}
	tcp := seg[iphl:]
	tcphl := int(tcp[12]>>4) * 4
	if tcphl < 20 || tcphl >= len(tcp) {
		return 0, fmt.Errorf("a segment whose TCP header of %d bytes leaves no data in %d", tcphl, len(tcp))
	}
	if f := tcp[13]; f&tcpFlagACK == 0 || f&^(tcpFlagACK|tcpFlagPSH|tcpFlagFIN) != 0 {
		return 0, fmt.Errorf("a segment with TCP flags %#02x (only ACK, PSH and FIN travel in segments)", f)
	}
	if size < MinSegmentSize {
		return 0, fmt.Errorf("a segment size of %d, less than %d", size, MinSegmentSize)
	}
	data := len(tcp) - tcphl
	packets = (data + size - 1) / size
	if packets > MaxSegmentPackets {
		return 0, fmt.Errorf("a segment of %d packets of %d bytes, more than %d", packets, size, MaxSegmentPackets)
	}
	if packets < 2 {
		return 0, fmt.Errorf("a segment of %d bytes of data in packets of %d: one packet, not a segment", data, size)
	}
	return packets, nil
}

// SegmentHeaderLen is the length of seg's IP and TCP headers, which every
// packet cut from it repeats; seg is one CheckSegment accepted.
func SegmentHeaderLen(seg []byte) int {
	iphl := 20
	if seg[0]>>4 == 6 {
		iphl = 40
	}
	return iphl + int(seg[iphl+12]>>4)*4
}

// SegmentPackets is how many packets seg, one CheckSegment accepted with
// size (as every segment ReadSegment keeps was), makes.
func SegmentPackets(seg []byte, size int) int {
	data := len(seg) - SegmentHeaderLen(seg)
	return (data + size - 1) / size
}

// SegmentWireBytes is how many bytes the packets seg makes put on the
// network: the segment, and its headers again in every packet after the first.
func SegmentWireBytes(seg []byte, packets int) int {
	return len(seg) + (packets-1)*SegmentHeaderLen(seg)
}
