//go:build linux

package tun

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The kernel's offloads on a tun device (IFF_VNET_HDR, TUNSETOFFLOAD with
// TUN_F_CSUM, TUN_F_TSO4 and TUN_F_TSO6): every read and write starts with a
// virtio-net header (struct virtio_net_hdr, 10 bytes, in the host's byte
// order). On a read it may describe a TCP segment of many packets (a GSO
// type, the packets' payload size) or a packet whose transport checksum the
// reader must finish (NEEDS_CSUM); on a write it lets TP hand the kernel many
// packets of one TCP flow as one segment.

const (
	vnetHdrLen     = 10
	vnetFNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	vnetGSONone    = 0
	vnetGSOTCPv4   = 1
	vnetGSOTCPv6   = 4
)

type vnetHdr struct {
	flags, gsoType                         uint8
	hdrLen, gsoSize, csumStart, csumOffset uint16
}

func (h *vnetHdr) decode(b []byte) {
	h.flags, h.gsoType = b[0], b[1]
	h.hdrLen = binary.NativeEndian.Uint16(b[2:])
	h.gsoSize = binary.NativeEndian.Uint16(b[4:])
	h.csumStart = binary.NativeEndian.Uint16(b[6:])
	h.csumOffset = binary.NativeEndian.Uint16(b[8:])
}

func (h *vnetHdr) encode(b []byte) {
	b[0], b[1] = h.flags, h.gsoType
	binary.NativeEndian.PutUint16(b[2:], h.hdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.gsoSize)
	binary.NativeEndian.PutUint16(b[6:], h.csumStart)
	binary.NativeEndian.PutUint16(b[8:], h.csumOffset)
}

var errTooManySegments = errors.New("the segment has more packets than the batch holds")

// split turns what one read returned (the virtio-net header, then a packet
// or a segment) into packets at bufs[i][offset:], their lengths in sizes.
func split(in []byte, bufs [][]byte, sizes []int, offset int) (int, error) {
	if len(in) < vnetHdrLen {
		return 0, fmt.Errorf("a read of %d bytes, shorter than its virtio-net header", len(in))
	}
	return splitRead(in[:vnetHdrLen], in[vnetHdrLen:], bufs, sizes, offset)
}

// splitRead is split with the read's virtio-net header vh apart from its
// packet or segment pkt.
func splitRead(vh, pkt []byte, bufs [][]byte, sizes []int, offset int) (int, error) {
	var h vnetHdr
	h.decode(vh)
	switch h.gsoType {
	case vnetGSONone:
		if h.flags&vnetFNeedsCsum != 0 {
			at := int(h.csumStart) + int(h.csumOffset)
			if int(h.csumStart) >= len(pkt) || at+2 > len(pkt) {
				return 0, fmt.Errorf("a packet's checksum at %d is beyond its %d bytes", at, len(pkt))
			}
			// The field holds the pseudo-header's sum; the rest is ours.
			initial := uint32(binary.BigEndian.Uint16(pkt[at:]))
			binary.BigEndian.PutUint16(pkt[at:], 0)
			binary.BigEndian.PutUint16(pkt[at:], ^fold(sum(pkt[h.csumStart:], initial)))
		}
		if len(pkt) > len(bufs[0])-offset {
			return 0, fmt.Errorf("a packet of %d bytes, longer than the buffer's %d", len(pkt), len(bufs[0])-offset)
		}
		sizes[0] = copy(bufs[0][offset:], pkt)
		return 1, nil
	case vnetGSOTCPv4, vnetGSOTCPv6:
		return splitTCP(pkt, h, bufs, sizes, offset)
	default:
		return 0, fmt.Errorf("a segment of GSO type %d, which this device did not offer to take", h.gsoType)
	}
}

// keepSegment reports the segment size of pkt, which a read returned behind
// the virtio-net header vh, when it is a TCP segment that may cross a
// tunnel whole (CheckSegment); 0 when it is to be split.
func keepSegment(vh, pkt []byte) int {
	var h vnetHdr
	h.decode(vh)
	if h.gsoType != vnetGSOTCPv4 && h.gsoType != vnetGSOTCPv6 || h.flags&vnetFNeedsCsum == 0 {
		return 0
	}
	iphl := 20
	if h.gsoType == vnetGSOTCPv6 {
		iphl = 40
	}
	if int(h.csumStart) != iphl || h.csumOffset != 16 {
		return 0 // IPv4 options or IPv6 extension headers: split
	}
	if _, err := CheckSegment(pkt, int(h.gsoSize)); err != nil {
		return 0
	}
	return int(h.gsoSize)
}

// segmentHeader prepares seg, a segment CheckSegment accepted, for the
// kernel to cut into packets of size bytes of payload: its IPv4 header's
// checksum, the pseudo-header's sum in its TCP checksum (CHECKSUM_PARTIAL),
// and the virtio-net header that asks for the cut, written to vh.
func segmentHeader(vh, seg []byte, size int) {
	v6 := seg[0]>>4 == 6
	iphl, gso := 20, uint8(vnetGSOTCPv4)
	if v6 {
		iphl, gso = 40, vnetGSOTCPv6
	} else {
		binary.BigEndian.PutUint16(seg[10:], 0)
		binary.BigEndian.PutUint16(seg[10:], ^fold(sum(seg[:20], 0)))
	}
	tcp := seg[iphl:]
	binary.BigEndian.PutUint16(tcp[16:], fold(pseudo(seg, v6, len(tcp))))
	(&vnetHdr{flags: vnetFNeedsCsum, gsoType: gso, hdrLen: uint16(SegmentHeaderLen(seg)), gsoSize: uint16(size),
		csumStart: uint16(iphl), csumOffset: 16}).encode(vh)
}

// splitTCP cuts a TCP segment into packets of h.gsoSize bytes of payload,
// each with its own IP and TCP header and checksums.
func splitTCP(pkt []byte, h vnetHdr, bufs [][]byte, sizes []int, offset int) (int, error) {
	v6 := h.gsoType == vnetGSOTCPv6
	iphl := int(h.csumStart)
	version := byte(4)
	if v6 {
		version = 6
	}
	if v6 && iphl < 40 || !v6 && iphl < 20 || iphl+20 > len(pkt) || pkt[0]>>4 != version {
		return 0, fmt.Errorf("a TCP segment with an IP header of %d bytes in %d", iphl, len(pkt))
	}
	tcphl := int(pkt[iphl+12]>>4) * 4
	hdrLen := iphl + tcphl
	if tcphl < 20 || hdrLen > len(pkt) || h.gsoSize == 0 {
		return 0, fmt.Errorf("a TCP segment with a TCP header of %d bytes or a packet size of %d", tcphl, h.gsoSize)
	}
	data := pkt[hdrLen:]
	seq0 := binary.BigEndian.Uint32(pkt[iphl+4:])
	id0 := binary.BigEndian.Uint16(pkt[4:])
	mss := int(h.gsoSize)
	i := 0
	for off := 0; off < len(data); off += mss {
		if i == len(bufs) {
			return i, errTooManySegments
		}
		end := min(off+mss, len(data))
		total := hdrLen + end - off
		out := bufs[i][offset:]
		if len(out) < total {
			return i, fmt.Errorf("a packet of %d bytes, longer than the buffer's %d", total, len(out))
		}
		copy(out, pkt[:hdrLen])
		copy(out[hdrLen:], data[off:end])
		out = out[:total]
		if v6 {
			binary.BigEndian.PutUint16(out[4:], uint16(total-40))
		} else {
			binary.BigEndian.PutUint16(out[2:], uint16(total))
			binary.BigEndian.PutUint16(out[4:], id0+uint16(i))
			binary.BigEndian.PutUint16(out[10:], 0)
			binary.BigEndian.PutUint16(out[10:], ^fold(sum(out[:iphl], 0)))
		}
		tcp := out[iphl:]
		binary.BigEndian.PutUint32(tcp[4:], seq0+uint32(off))
		if end != len(data) {
			tcp[13] &^= tcpFlagFIN | tcpFlagPSH
		}
		binary.BigEndian.PutUint16(tcp[16:], 0)
		binary.BigEndian.PutUint16(tcp[16:], ^fold(sum(tcp, pseudo(out, v6, len(tcp)))))
		sizes[i] = total
		i++
	}
	return i, nil
}

// A packet that may join others: IPv4 without options and unfragmented, or
// IPv6 without extension headers, carrying TCP with a payload and no flags
// beyond ACK and PSH.
type tcpPacket struct {
	v6           bool
	iphl, tcphl  int
	seq          uint32
	payload      int
	flags        byte
	checksumGood bool
}

func parseJoinable(p []byte) (tcpPacket, bool) {
	var t tcpPacket
	switch {
	case len(p) >= 40 && p[0] == 0x45:
		if int(binary.BigEndian.Uint16(p[2:])) != len(p) || p[9] != ipProtoTCP || binary.BigEndian.Uint16(p[6:])&0x3fff != 0 {
			return t, false // a length that lies, not TCP, or a fragment
		}
		t.iphl = 20
	case len(p) >= 60 && p[0]>>4 == 6:
		if int(binary.BigEndian.Uint16(p[4:]))+40 != len(p) || p[6] != ipProtoTCP {
			return t, false
		}
		t.v6, t.iphl = true, 40
	default:
		return t, false
	}
	tcp := p[t.iphl:]
	t.tcphl = int(tcp[12]>>4) * 4
	if t.tcphl < 20 || t.tcphl > len(tcp) {
		return t, false
	}
	t.flags = tcp[13]
	t.payload = len(tcp) - t.tcphl
	if t.flags&^(tcpFlagACK|tcpFlagPSH) != 0 || t.flags&tcpFlagACK == 0 || t.payload == 0 {
		return t, false
	}
	t.seq = binary.BigEndian.Uint32(tcp[4:])
	t.checksumGood = fold(sum(tcp, pseudo(p, t.v6, len(tcp)))) == 0xffff
	return t, t.checksumGood
}

// joins reports whether p (parsed as pt) continues the segment head (parsed
// as ht, of joined payload bytes of ht.payload each so far): the same flow,
// headers alike, the next sequence number, the same payload size (or a
// smaller last one).
func joins(head []byte, ht tcpPacket, joined int, p []byte, pt tcpPacket) bool {
	if pt.v6 != ht.v6 || pt.tcphl != ht.tcphl || pt.payload > ht.payload || pt.seq != ht.seq+uint32(joined) {
		return false
	}
	if ht.flags&tcpFlagPSH != 0 || joined%ht.payload != 0 || len(head)+pt.payload > maxSegmentLength {
		return false // the head ended its run (PSH, or a short last packet), or it is full
	}
	if pt.v6 {
		// Version, traffic class, flow label; hop limit, addresses.
		if string(head[0:4]) != string(p[0:4]) || head[7] != p[7] || string(head[8:40]) != string(p[8:40]) {
			return false
		}
	} else if head[1] != p[1] || head[6]&0x40 != p[6]&0x40 || head[8] != p[8] || string(head[12:20]) != string(p[12:20]) {
		return false // TOS, DF, TTL, addresses
	}
	ht4, pt4 := head[ht.iphl:], p[pt.iphl:]
	// Ports and acknowledgement, then the window and options.
	return string(ht4[0:4]) == string(pt4[0:4]) && string(ht4[8:12]) == string(pt4[8:12]) &&
		string(ht4[20:ht.tcphl]) == string(pt4[20:pt.tcphl])
}

// finishJoined makes head, which holds joined payload bytes after its
// headers, one segment for the kernel: its IP length, and the virtio-net
// header in front (which the caller's headroom holds) asking the kernel to
// cut it into packets of ht.payload and to compute their checksums.
func finishJoined(buf []byte, ht tcpPacket, joined int) {
	head := buf[vnetHdrLen:]
	total := ht.iphl + ht.tcphl + joined
	if ht.v6 {
		binary.BigEndian.PutUint16(head[4:], uint16(total-40))
	} else {
		binary.BigEndian.PutUint16(head[2:], uint16(total))
		binary.BigEndian.PutUint16(head[10:], 0)
		binary.BigEndian.PutUint16(head[10:], ^fold(sum(head[:20], 0)))
	}
	tcp := head[ht.iphl:total]
	// CHECKSUM_PARTIAL: the field holds the pseudo-header's sum.
	binary.BigEndian.PutUint16(tcp[16:], fold(pseudo(head, ht.v6, len(tcp))))
	gso := uint8(vnetGSOTCPv4)
	if ht.v6 {
		gso = vnetGSOTCPv6
	}
	(&vnetHdr{flags: vnetFNeedsCsum, gsoType: gso, hdrLen: uint16(ht.iphl + ht.tcphl), gsoSize: uint16(ht.payload),
		csumStart: uint16(ht.iphl), csumOffset: 16}).encode(buf)
}

// joinBatch hands emit each write for the packets bufs[i][offset:], in
// order: a packet alone behind a zero virtio-net header, or a run of
// packets of one TCP flow joined into the first one's buffer (where its
// capacity allows) behind a header that asks the kernel to cut it again.
func joinBatch(bufs [][]byte, offset int, emit func(seg []byte, first, n int)) {
	for i := 0; i < len(bufs); {
		head := bufs[i][offset:]
		ht, ok := parseJoinable(head)
		j, joined := i+1, ht.payload
		if ok {
			for ; j < len(bufs); j++ {
				p := bufs[j][offset:]
				pt, ok := parseJoinable(p)
				if !ok || !joins(head, ht, joined, p, pt) || cap(bufs[i])-offset < len(head)+pt.payload {
					break
				}
				head = append(head, p[pt.iphl+pt.tcphl:]...)
				joined += pt.payload
				if pt.flags&tcpFlagPSH != 0 {
					ht.flags |= tcpFlagPSH
					head[ht.iphl+13] |= tcpFlagPSH
				}
			}
		}
		buf := bufs[i][offset-vnetHdrLen : offset+len(head)]
		if j == i+1 {
			clear(buf[:vnetHdrLen]) // one packet: no GSO, its checksum as it is
		} else {
			finishJoined(buf, ht, joined)
		}
		emit(buf, i, j-i)
		i = j
	}
}

// pseudo is the sum of the TCP pseudo-header of packet p for a TCP length
// of n.
func pseudo(p []byte, v6 bool, n int) uint32 {
	var s uint32
	if v6 {
		s = sum(p[8:40], 0)
	} else {
		s = sum(p[12:20], 0)
	}
	return s + ipProtoTCP + uint32(n)
}

// sum adds b's 16-bit big-endian words to s (one's complement, unfolded).
func sum(b []byte, s uint32) uint32 {
	var acc = uint64(s)
	for len(b) >= 8 {
		acc += uint64(binary.BigEndian.Uint32(b)) + uint64(binary.BigEndian.Uint32(b[4:]))
		b = b[8:]
	}
	for len(b) >= 2 {
		acc += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	for acc>>32 != 0 {
		acc = acc&0xffffffff + acc>>32
	}
	return uint32(acc)
}

// fold reduces a sum to 16 bits.
func fold(s uint32) uint16 {
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}
