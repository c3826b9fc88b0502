package direct

import (
	"encoding/binary"
	"net"
	"unsafe"

	"golang.org/x/sys/unix"
)

// offload turns on UDP receive coalescing (GRO) on udp and says whether the
// kernel takes segmentation offload (GSO) on it: with both, a burst of QUIC
// packets crosses the kernel, and every hop of the network stack on the way,
// as one buffer. It also sets the don't-fragment bit on what udp sends (IPv4;
// IPv6 routers never fragment) and never fragments it here: the size probe (probeMTU) measures the path
// itself, and a packet larger than the route learnt to carry is refused
// (EMSGSIZE) rather than sent in fragments a NAT may drop.
func offload(udp *net.UDPConn) (gso, gro bool) {
	raw, err := udp.SyscallConn()
	if err != nil {
		return false, false
	}
	_ = raw.Control(func(fd uintptr) {
		_, serr := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT)
		gso = serr == nil
		gro = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_DO)
	})
	return gso, gro
}

// segmentControl is the control message that makes one send of a buffer
// size-byte packets (the last may be shorter), written over b's space.
func segmentControl(b []byte, size int) []byte {
	b = append(b[:0], make([]byte, unix.CmsgSpace(2))...)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level = unix.IPPROTO_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(b[unix.CmsgLen(0):], uint16(size))
	return b
}

// coalescedSize is the size of the packets a coalesced read holds, from its
// control messages; 0 when it holds one.
func coalescedSize(oob []byte) int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return 0
	}
	for _, m := range msgs {
		if m.Header.Level == unix.IPPROTO_UDP && m.Header.Type == unix.UDP_GRO && len(m.Data) >= 4 {
			return int(binary.NativeEndian.Uint32(m.Data))
		}
	}
	return 0
}
