//go:build !linux

package wire

import "net"

// resetByPeer: only Linux is known to report a reset to one call alone.
func resetByPeer(net.Conn) bool { return false }
