//go:build !linux

package udpgro

import "net"

const (
	truncated  = 0x20 // MSG_TRUNC where it is defined; unused without coalescing
	ctruncated = 0x8  // MSG_CTRUNC likewise
)

func copyControl(dst, src []byte) (int, bool) {
	n := copy(dst, src)
	return n, n < len(src)
}

func enableGRO(*net.UDPConn) bool { return false }

func takeSegmentSize(oob []byte) (size, n int) { return 0, len(oob) }

// SendSegmentSize is 0: segmented sends are Linux's.
func SendSegmentSize([]byte) int { return 0 }

// IsSegmentationError is false: segmented sends are Linux's.
func IsSegmentationError(error) bool { return false }
