//go:build !linux

package carrier

// gsoSize: quic-go uses GSO only on Linux.
func gsoSize([]byte) int { return 0 }

// replyPacketInfo: the reply leaves from the address the kernel picks.
func replyPacketInfo([]byte) []byte { return nil }
