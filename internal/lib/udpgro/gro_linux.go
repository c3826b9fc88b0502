package udpgro

import (
	"encoding/binary"
	"errors"
	"net"

	"golang.org/x/sys/unix"
)

const (
	truncated  = unix.MSG_TRUNC
	ctruncated = unix.MSG_CTRUNC
)

// copyControl copies the whole control messages of src that fit in dst, in
// order, and reports whether any was left out: a message cut in half would
// make quic-go's parser fail and end its transport.
func copyControl(dst, src []byte) (n int, cut bool) {
	for len(src) > 0 {
		_, _, rest, err := unix.ParseOneSocketControlMessage(src)
		if err != nil {
			return n, true
		}
		m := len(src) - len(rest)
		if n+m > len(dst) {
			return n, true
		}
		n += copy(dst[n:], src[:m])
		src = rest
	}
	return n, false
}

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

// SendSegmentSize is the segment size of a UDP_SEGMENT control message in
// oob, which makes one send of a buffer many datagrams (GSO; quic-go asks for
// it that way), or 0 without one.
func SendSegmentSize(oob []byte) int {
	for len(oob) > 0 {
		hdr, body, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return 0
		}
		if hdr.Level == unix.IPPROTO_UDP && hdr.Type == unix.UDP_SEGMENT && len(body) >= 2 {
			return int(binary.NativeEndian.Uint16(body))
		}
		oob = rest
	}
	return 0
}

// IsSegmentationError reports whether err is the kernel refusing a segmented
// send (EIO: the route's device does not take GSO), which quic-go answers by
// sending without it.
func IsSegmentationError(err error) bool { return errors.Is(err, unix.EIO) }
