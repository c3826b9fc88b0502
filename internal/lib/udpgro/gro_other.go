//go:build !linux

package udpgro

import "net"

const truncated = 0x20 // MSG_TRUNC where it is defined; unused without coalescing

func enableGRO(*net.UDPConn) bool { return false }

func takeSegmentSize(oob []byte) (size, n int) { return 0, len(oob) }

// SendSegmentSize is 0: segmented sends are Linux's.
func SendSegmentSize([]byte) int { return 0 }

// IsSegmentationError is false: segmented sends are Linux's.
func IsSegmentationError(error) bool { return false }
