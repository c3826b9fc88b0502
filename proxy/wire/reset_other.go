//go:build !linux

package wire

import (
	"net"
	"syscall"
)

// resetByPeer: only Linux is known to report a reset to one call alone.
func resetByPeer(net.Conn) bool { return false }

var errResetByPeer = &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
