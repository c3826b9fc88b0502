//go:build !linux

package carrier

// gsoSize: quic-go uses GSO only on Linux.
func gsoSize([]byte) int { return 0 }
