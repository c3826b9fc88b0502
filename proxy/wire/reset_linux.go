//go:build linux

package wire

import (
	"net"

	"golang.org/x/sys/unix"
)

// resetByPeer reports whether the TCP connection c, which a read has just
// found at its end, was reset by its peer rather than closed. Linux reports a
// reset (ECONNRESET) once, to whichever call comes first: when a write to
// the same socket on another goroutine took it, the read that follows the
// last buffered bytes returns a plain end of stream. The socket's state
// tells the two apart as long as this end has not sent its own FIN: a peer's
// FIN then leaves it in CLOSE_WAIT, a reset in CLOSE (after both FINs it is
// CLOSE too, its TIME_WAIT kept elsewhere: the caller asks only before it
// half-closed).
func resetByPeer(c net.Conn) bool {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return false
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return false
	}
	var state uint8
	if err := rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			state = info.State
		}
	}); err != nil {
		return false
	}
	return state == tcpStateClose
}

// tcpStateClose is TCP_CLOSE in Linux's enum of TCP states.
const tcpStateClose = 7
