package direct

import (
	"net"

	"golang.org/x/sys/windows"
)

// The socket options of ws2ipdef.h that golang.org/x/sys/windows does not name.
const (
	ipDontFragment = 14 // IP_DONTFRAGMENT
	ipv6DontFrag   = 14 // IPV6_DONTFRAG
)

// offload sets the don't-fragment bit on what udp sends, for the size probe
// (see offload_linux.go); segmentation offload is not used on Windows.
func offload(udp *net.UDPConn) (gso, gro bool) {
	if raw, err := udp.SyscallConn(); err == nil {
		_ = raw.Control(func(fd uintptr) {
			_ = windows.SetsockoptInt(windows.Handle(fd), windows.IPPROTO_IP, ipDontFragment, 1)
			_ = windows.SetsockoptInt(windows.Handle(fd), windows.IPPROTO_IPV6, ipv6DontFrag, 1)
		})
	}
	return false, false
}

func segmentControl(b []byte, _ int) []byte { return b }

func coalescedSize([]byte) int { return 0 }
