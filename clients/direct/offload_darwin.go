package direct

import (
	"net"

	"golang.org/x/sys/unix"
)

// offload sets the don't-fragment bit on what udp sends, for the size probe
// (see offload_linux.go); macOS has no UDP segmentation offload to turn on.
func offload(udp *net.UDPConn) (gso, gro bool) {
	if raw, err := udp.SyscallConn(); err == nil {
		_ = raw.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_DONTFRAG, 1)
			_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_DONTFRAG, 1)
		})
	}
	return false, false
}

func segmentControl(b []byte, _ int) []byte { return b }

func coalescedSize([]byte) int { return 0 }
