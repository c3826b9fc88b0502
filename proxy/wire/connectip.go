package wire

// CONNECT-IP (RFC 9484) as both ends speak it: the capsules that assign
// addresses and advertise routes, the DATAGRAM capsule (RFC 9297 §3.5) that
// carries packets where HTTP/3 datagrams cannot (HTTP/2), the HTTP Datagram
// payload (context ID 0, then one IP packet), and the few IP header fields both
// ends check on every packet. docs/IP.md describes how TP uses them.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"

	"github.com/quic-go/quic-go/quicvarint"
)

// ConnectIPProtocol is the :protocol of a CONNECT-IP request.
const ConnectIPProtocol = "connect-ip"

// IPCapsule types (RFC 9297 §5.4, RFC 9484 §4.7).
const (
	IPCapsuleDatagram           uint64 = 0x00
	IPCapsuleAddressAssign      uint64 = 0x01
	IPCapsuleAddressRequest     uint64 = 0x02
	IPCapsuleRouteAdvertisement uint64 = 0x03
	// IPCapsuleTCPSegment is TP's own: a TCP segment of up to 64 KiB, sent
	// whole once both ends agreed to TCPSegmentsHeader (AppendIPSegment).
	IPCapsuleTCPSegment uint64 = 0x747053
)

// Bounds on what a peer can make the other end hold. A capsule TP reads is at
// most MaxIPCapsule bytes (a DATAGRAM capsule carries one packet of at most
// MaxIPPacket bytes; address and route capsules list at most MaxIPCapsuleEntries
// entries); anything larger ends the tunnel as malformed.
const (
	MaxIPPacket         = 65535
	MaxIPCapsule        = MaxIPPacket + 16
	MaxIPCapsuleEntries = 256
)

// AssignedAddress is one entry of ADDRESS_ASSIGN or ADDRESS_REQUEST.
type AssignedAddress struct {
	RequestID uint64
	Prefix    netip.Prefix
}

// IPRoute is one IP Address Range of ROUTE_ADVERTISEMENT: packets to addresses
// from Start to End (inclusive) with IP protocol Protocol (0: any) may be sent.
type IPRoute struct {
	Start, End netip.Addr
	Protocol   uint8
}

// Contains reports whether a packet to dst with IP protocol proto is within r.
func (r IPRoute) Contains(dst netip.Addr, proto uint8) bool {
	return (r.Protocol == 0 || r.Protocol == proto) && r.Start.BitLen() == dst.BitLen() &&
		r.Start.Compare(dst) <= 0 && dst.Compare(r.End) <= 0
}

// RouteOf is the range a prefix covers, for protocol proto.
func RouteOf(p netip.Prefix, proto uint8) IPRoute {
	p = p.Masked()
	a := p.Addr().AsSlice()
	bits := p.Bits()
	for i := range a {
		for b := 0; b < 8; b++ {
			if i*8+b >= bits {
				a[i] |= 0x80 >> b
			}
		}
	}
	end, _ := netip.AddrFromSlice(a)
	return IPRoute{Start: p.Addr(), End: end, Protocol: proto}
}

// IPCapsule is one capsule as read: its type and payload.
type IPCapsule struct {
	Type    uint64
	Payload []byte
}

// AppendIPCapsule appends a capsule of type t with payload to b.
func AppendIPCapsule(b []byte, t uint64, payload []byte) []byte {
	b = quicvarint.Append(b, t)
	b = quicvarint.Append(b, uint64(len(payload)))
	return append(b, payload...)
}

// ReadIPCapsule reads one capsule. A capsule longer than MaxIPCapsule is an error
// (its payload is not read); io.EOF means the stream ended between capsules,
// io.ErrUnexpectedEOF that it ended inside one.
func ReadIPCapsule(r *bufio.Reader) (IPCapsule, error) {
	t, n, err := readCapsuleHeader(r)
	if err != nil {
		return IPCapsule{}, err
	}
	return readCapsulePayload(r, t, n)
}

// NextIPCapsule reads one capsule as ReadIPCapsule does, but leaves its
// payload in r's buffer when it fits there: the payload is valid only until
// the next read from r. A tunnel's readers use it, which copy each packet
// into their batch for the tun device before they read on: no allocation
// and no copy per packet.
func NextIPCapsule(r *bufio.Reader) (IPCapsule, error) {
	t, n, err := readCapsuleHeader(r)
	if err != nil {
		return IPCapsule{}, err
	}
	if int(n) > r.Size() {
		return readCapsulePayload(r, t, n)
	}
	p, err := r.Peek(int(n))
	if err != nil {
		return IPCapsule{}, unexpected(err)
	}
	_, _ = r.Discard(int(n))
	return IPCapsule{Type: t, Payload: p}, nil
}

// readCapsuleHeader reads a capsule's type and length, and refuses a length
// beyond MaxIPCapsule.
func readCapsuleHeader(r *bufio.Reader) (t, n uint64, err error) {
	if t, err = quicvarint.Read(r); err != nil {
		return 0, 0, err
	}
	if n, err = quicvarint.Read(r); err != nil {
		return 0, 0, unexpected(err)
	}
	if n > MaxIPCapsule {
		return 0, 0, fmt.Errorf("capsule of type %#x is %d bytes long, more than the %d this end accepts", t, n, MaxIPCapsule)
	}
	return t, n, nil
}

// readCapsulePayload reads a payload of n bytes into a slice of its own.
func readCapsulePayload(r *bufio.Reader, t, n uint64) (IPCapsule, error) {
	p := make([]byte, n)
	if _, err := io.ReadFull(r, p); err != nil {
		return IPCapsule{}, unexpected(err)
	}
	return IPCapsule{Type: t, Payload: p}, nil
}

func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// AppendIPDatagram appends the HTTP Datagram payload of a CONNECT-IP packet
// (context ID 0, RFC 9484 §6) to b.
func AppendIPDatagram(b, packet []byte) []byte {
	return append(append(b, 0), packet...)
}

// ParseIPDatagram returns the IP packet of an HTTP Datagram payload; ok is false
// for another context ID (which the receiver drops, RFC 9484 §6) or a malformed one.
func ParseIPDatagram(p []byte) (packet []byte, ok bool) {
	id, n, err := quicvarint.Parse(p)
	if err != nil || id != 0 {
		return nil, false
	}
	return p[n:], true
}

// TCPSegmentsHeader is the CONNECT-IP request header (a structured-field
// boolean, "?1") with which a client asks the server to carry TCP segments
// whole (TCP_SEGMENT capsules, IPCapsuleTCPSegment), as the kernel hands them
// over, instead of cut into packets: over HTTP/2, and over HTTP/3 together
// with StreamTCPHeader. A server that takes and sends them answers with the
// same header; only then do both ends send them. docs/IP.md ("Segments
// whole") says why.
const TCPSegmentsHeader = "TP-TCP-Segments"

// AppendIPSegment appends a TCP_SEGMENT capsule to b: context ID 0, the
// segment size (the TCP payload bytes of each packet the segment makes, 2
// bytes, network order) and the segment, an IP packet longer than the
// tunnel's MTU whose TCP payload the receiver cuts into packets of that
// size, each with the segment's headers.
func AppendIPSegment(b, segment []byte, size int) []byte {
	b = quicvarint.Append(b, IPCapsuleTCPSegment)
	b = quicvarint.Append(b, uint64(3+len(segment)))
	b = append(b, 0, byte(size>>8), byte(size))
	return append(b, segment...)
}

// ParseIPSegment returns the segment and its segment size of a TCP_SEGMENT
// capsule's payload; ok is false for another context ID (dropped, as for
// DATAGRAM capsules) or a payload too short to hold them.
func ParseIPSegment(p []byte) (segment []byte, size int, ok bool) {
	id, n, err := quicvarint.Parse(p)
	if err != nil || id != 0 || len(p) < n+2 {
		return nil, 0, false
	}
	return p[n+2:], int(p[n])<<8 | int(p[n+1]), true
}

func appendAddr(b []byte, a netip.Addr) []byte {
	if a.Is4() {
		return append(append(b, 4), a.AsSlice()...)
	}
	return append(append(b, 6), a.AsSlice()...)
}

func readAddr(b []byte) (netip.Addr, []byte, error) {
	if len(b) < 1 {
		return netip.Addr{}, nil, io.ErrUnexpectedEOF
	}
	n := 0
	switch b[0] {
	case 4:
		n = 4
	case 6:
		n = 16
	default:
		return netip.Addr{}, nil, fmt.Errorf("IP version %d is neither 4 nor 6", b[0])
	}
	if len(b) < 1+n {
		return netip.Addr{}, nil, io.ErrUnexpectedEOF
	}
	a, _ := netip.AddrFromSlice(b[1 : 1+n])
	return a, b[1+n:], nil
}

// AppendAddresses appends an ADDRESS_ASSIGN (or, with t IPCapsuleAddressRequest,
// ADDRESS_REQUEST) capsule to b.
func AppendAddresses(b []byte, t uint64, addrs []AssignedAddress) []byte {
	var p []byte
	for _, a := range addrs {
		p = quicvarint.Append(p, a.RequestID)
		p = appendAddr(p, a.Prefix.Addr())
		p = append(p, byte(a.Prefix.Bits()))
	}
	return AppendIPCapsule(b, t, p)
}

// ParseAddresses parses the payload of ADDRESS_ASSIGN or ADDRESS_REQUEST.
// Prefixes must have their host bits clear (RFC 9484 §4.7.1).
func ParseAddresses(p []byte) ([]AssignedAddress, error) {
	var out []AssignedAddress
	for len(p) > 0 {
		if len(out) == MaxIPCapsuleEntries {
			return nil, fmt.Errorf("more than %d addresses in one capsule", MaxIPCapsuleEntries)
		}
		id, n, err := quicvarint.Parse(p)
		if err != nil {
			return nil, io.ErrUnexpectedEOF
		}
		a, rest, err := readAddr(p[n:])
		if err != nil {
			return nil, err
		}
		if len(rest) < 1 {
			return nil, io.ErrUnexpectedEOF
		}
		bits := int(rest[0])
		if bits > a.BitLen() {
			return nil, fmt.Errorf("prefix length %d is longer than an IPv%d address", bits, map[int]int{32: 4, 128: 6}[a.BitLen()])
		}
		pfx := netip.PrefixFrom(a, bits)
		if pfx.Masked() != pfx {
			return nil, fmt.Errorf("address %s has bits set beyond its prefix length", pfx)
		}
		out = append(out, AssignedAddress{RequestID: id, Prefix: pfx})
		p = rest[1:]
	}
	return out, nil
}

// AppendRoutes appends a ROUTE_ADVERTISEMENT capsule to b; routes must satisfy
// ValidateRoutes.
func AppendRoutes(b []byte, routes []IPRoute) []byte {
	var p []byte
	for _, r := range routes {
		p = appendAddr(p, r.Start)
		p = append(p, r.End.AsSlice()...)
		p = append(p, r.Protocol)
	}
	return AppendIPCapsule(b, IPCapsuleRouteAdvertisement, p)
}

// ParseRoutes parses and validates the payload of ROUTE_ADVERTISEMENT.
func ParseRoutes(p []byte) ([]IPRoute, error) {
	var out []IPRoute
	for len(p) > 0 {
		if len(out) == MaxIPCapsuleEntries {
			return nil, fmt.Errorf("more than %d routes in one capsule", MaxIPCapsuleEntries)
		}
		start, rest, err := readAddr(p)
		if err != nil {
			return nil, err
		}
		n := start.BitLen() / 8
		if len(rest) < n+1 {
			return nil, io.ErrUnexpectedEOF
		}
		end, _ := netip.AddrFromSlice(rest[:n])
		out = append(out, IPRoute{Start: start, End: end, Protocol: rest[n]})
		p = rest[n+1:]
	}
	return out, ValidateRoutes(out)
}

// ValidateRoutes checks the rules of RFC 9484 §4.7.3: each range's start is
// not after its end, and for consecutive ranges A and B, A's IP version is at
// most B's; with equal versions A's protocol is at most B's; with equal
// versions and protocols A ends before B starts.
func ValidateRoutes(routes []IPRoute) error {
	for i, r := range routes {
		if !r.Start.IsValid() || r.Start.BitLen() != r.End.BitLen() || r.Start.Compare(r.End) > 0 {
			return fmt.Errorf("route %d (%s to %s) is not a range", i, r.Start, r.End)
		}
		if i == 0 {
			continue
		}
		a := routes[i-1]
		switch {
		case a.Start.BitLen() < r.Start.BitLen():
		case a.Start.BitLen() > r.Start.BitLen():
			return errors.New("routes are not ordered by IP version")
		case a.Protocol < r.Protocol:
		case a.Protocol > r.Protocol:
			return errors.New("routes of one IP version are not ordered by protocol")
		case a.End.Compare(r.Start) >= 0:
			return fmt.Errorf("routes %s-%s and %s-%s overlap or are out of order", a.Start, a.End, r.Start, r.End)
		}
	}
	return nil
}

// IP protocol numbers TP looks at.
const (
	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoICMPv6 = 58
)

// IPHeader is what both ends read of a packet: addresses, upper-layer protocol
// (for IPv6, the Next Header of the fixed header; extension headers are not
// walked, so a route for protocol 0 is needed to pass them), and length.
type IPHeader struct {
	Src, Dst netip.Addr
	Proto    uint8
}

// ParseIPHeader checks that p is one whole IPv4 or IPv6 packet (its length
// fields match len(p)) and returns its header fields.
func ParseIPHeader(p []byte) (IPHeader, error) {
	if len(p) == 0 {
		return IPHeader{}, errors.New("empty packet")
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return IPHeader{}, errors.New("IPv4 packet shorter than its header")
		}
		ihl := int(p[0]&0x0f) * 4
		if ihl < 20 || int(binary.BigEndian.Uint16(p[2:4])) != len(p) || ihl > len(p) {
			return IPHeader{}, errors.New("IPv4 packet whose length fields do not match its size")
		}
		return IPHeader{Src: netip.AddrFrom4([4]byte(p[12:16])), Dst: netip.AddrFrom4([4]byte(p[16:20])), Proto: p[9]}, nil
	case 6:
		if len(p) < 40 || int(binary.BigEndian.Uint16(p[4:6]))+40 != len(p) {
			return IPHeader{}, errors.New("IPv6 packet whose length fields do not match its size")
		}
		return IPHeader{Src: netip.AddrFrom16([16]byte(p[8:24])), Dst: netip.AddrFrom16([16]byte(p[24:40])), Proto: p[6]}, nil
	}
	return IPHeader{}, fmt.Errorf("IP version %d is neither 4 nor 6", p[0]>>4)
}

// StreamTCPHeader is the CONNECT-IP request header (a structured-field
// boolean, "?1") with which a client over HTTP/3 asks the server to send the
// tunnel's TCP segments, all but pure acknowledgements (OnStream), as DATAGRAM
// capsules on the request stream (RFC 9297 §3.5) instead of QUIC DATAGRAM
// frames; a server that does so answers with the same header, and only then
// does the client do the same. Everything else stays a QUIC datagram.
// docs/IP.md ("TCP on the stream") says why.
const StreamTCPHeader = "TP-Stream-TCP"

// TCP flags that make a segment more than a pure acknowledgement.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
)

// OnStream reports whether pkt, a whole packet ParseIPHeader accepted, is a
// TCP segment that carries data, a SYN, a FIN or a RST: what travels on the
// request stream once both ends agreed to StreamTCPHeader. Pure
// acknowledgements, other protocols, IPv4 fragments and IPv6 packets with
// extension headers are not, nor is anything too short to hold a TCP header.
func OnStream(pkt []byte) bool {
	var off int
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		off = int(pkt[0]&0x0f) * 4
		if pkt[9] != ProtoTCP || binary.BigEndian.Uint16(pkt[6:8])&0x3fff != 0 {
			return false
		}
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		off = 40
		if pkt[6] != ProtoTCP {
			return false
		}
	default:
		return false
	}
	if len(pkt) < off+20 {
		return false
	}
	doff := int(pkt[off+12]>>4) * 4
	return pkt[off+13]&(tcpFIN|tcpSYN|tcpRST) != 0 || len(pkt) > off+doff
}

// IPPacketMTU is the largest IP packet that fits one HTTP/3 datagram of the
// request stream streamID when QUIC DATAGRAM frames can carry at most
// maxFrame bytes (quic-go's DatagramTooLargeError.MaxDatagramPayloadSize,
// which counts the quarter stream ID its http3 prepends): maxFrame less the
// quarter stream ID and the context ID 0 (RFC 9297 §2.1, RFC 9484 §6).
func IPPacketMTU(maxFrame int64, streamID int64) int {
	return int(maxFrame) - quicvarint.Len(uint64(streamID/4)) - 1
}

// PacketTooBigReply is the ICMP error that tells the sender of pkt the
// largest packet that fits one HTTP/3 datagram of request stream streamID
// when DATAGRAM frames carry at most maxFrame bytes (IPPacketMTU), or nil
// when that is below the minimum MTU of pkt's family or pkt is no IP packet.
func PacketTooBigReply(pkt []byte, maxFrame, streamID int64) []byte {
	h, err := ParseIPHeader(pkt)
	if err != nil {
		return nil
	}
	mtu := IPPacketMTU(maxFrame, streamID)
	if mtu < PacketTooBigFloor(h.Src) {
		return nil
	}
	return PacketTooBig(pkt, mtu)
}

// PacketTooBigFloor is the smallest MTU an ICMP error may announce for a
// packet from src: 576 for IPv4 (RFC 1191 plateaus start there), 1280 for
// IPv6 (RFC 8200 §5).
func PacketTooBigFloor(src netip.Addr) int {
	if src.Is4() {
		return 576
	}
	return 1280
}

// PacketTooBig returns the ICMP error that tells the sender of packet (a whole
// packet ParseIPHeader accepted) to send packets of at most mtu bytes: ICMPv4
// "fragmentation needed" or ICMPv6 "packet too big", from the packet's
// destination to its source, quoting as much of it as fits in 576 bytes (IPv4)
// or 1280 bytes (IPv6).
func PacketTooBig(packet []byte, mtu int) []byte {
	h, err := ParseIPHeader(packet)
	if err != nil {
		return nil
	}
	if h.Src.Is4() {
		quote := packet[:min(len(packet), 576-20-8)]
		icmp := make([]byte, 8+len(quote))
		icmp[0], icmp[1] = 3, 4 // destination unreachable, fragmentation needed
		binary.BigEndian.PutUint16(icmp[6:8], uint16(mtu))
		copy(icmp[8:], quote)
		binary.BigEndian.PutUint16(icmp[2:4], checksum(icmp, 0))
		ip := make([]byte, 20, 20+len(icmp))
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:4], uint16(20+len(icmp)))
		ip[8], ip[9] = 64, ProtoICMP
		copy(ip[12:16], h.Dst.AsSlice())
		copy(ip[16:20], h.Src.AsSlice())
		binary.BigEndian.PutUint16(ip[10:12], checksum(ip, 0))
		return append(ip, icmp...)
	}
	quote := packet[:min(len(packet), 1280-40-8)]
	icmp := make([]byte, 8+len(quote))
	icmp[0] = 2 // packet too big
	binary.BigEndian.PutUint32(icmp[4:8], uint32(mtu))
	copy(icmp[8:], quote)
	ip := make([]byte, 40, 40+len(icmp))
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:6], uint16(len(icmp)))
	ip[6], ip[7] = ProtoICMPv6, 64
	copy(ip[8:24], h.Dst.AsSlice())
	copy(ip[24:40], h.Src.AsSlice())
	// The ICMPv6 checksum covers a pseudo-header: addresses, length, next header.
	var sum uint32
	for i := 8; i < 40; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	sum += uint32(len(icmp)) + ProtoICMPv6
	binary.BigEndian.PutUint16(icmp[2:4], checksum(icmp, sum))
	return append(ip, icmp...)
}

// checksum is the Internet checksum (RFC 1071) of b, starting from sum.
func checksum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// CapsuleBuffered reports whether r holds a whole capsule, which
// ReadIPCapsule then returns without reading the connection: a reader that
// gathers packets for one write flushes them before a read that may wait.
func CapsuleBuffered(r *bufio.Reader) bool {
	b, _ := r.Peek(r.Buffered())
	_, k1, err := quicvarint.Parse(b)
	if err != nil {
		return false
	}
	n, k2, err := quicvarint.Parse(b[k1:])
	if err != nil {
		return false
	}
	return uint64(len(b)-k1-k2) >= n
}
