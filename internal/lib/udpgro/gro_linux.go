package udpgro

import (
	"encoding/binary"
	"net"

	"golang.org/x/sys/unix"
)

const truncated = unix.MSG_TRUNC

// enableGRO turns on receive coalescing for udp and reports whether the
// kernel took it (Linux 5.0 and later).
func enableGRO(udp *net.UDPConn) bool {
	raw, err := udp.SyscallConn()
	if err != nil {
		return false
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1)
	}); err != nil {
		return false
	}
	return serr == nil
}

// takeSegmentSize returns the segment size of a coalesced read's UDP_GRO
// control message in oob (0 without one) and how long oob is with that
// message taken out (the others move up in place).
func takeSegmentSize(oob []byte) (size, n int) {
	rest := oob
	for len(rest) > 0 {
		hdr, body, next, err := unix.ParseOneSocketControlMessage(rest)
		if err != nil {
			return size, len(oob) // a malformed tail stays, as the kernel wrote it
		}
		msgLen := len(rest) - len(next)
		if hdr.Level == unix.IPPROTO_UDP && hdr.Type == unix.UDP_GRO && len(body) >= 4 {
			size = int(binary.NativeEndian.Uint32(body))
			// Move the messages after it up over it.
			start := len(oob) - len(rest)
			copy(oob[start:], next)
			oob = oob[:len(oob)-msgLen]
			rest = oob[start:]
			continue
		}
		rest = next
	}
	return size, len(oob)
}
