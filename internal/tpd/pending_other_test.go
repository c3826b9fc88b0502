//go:build !unix

package tpd

import (
	"net"
	"testing"
	"time"
)

// pending reports whether a datagram waits in udp's receive queue. Without
// MSG_DONTWAIT it reads with a deadline just ahead: one already queued is
// returned at once.
func pending(t *testing.T, udp *net.UDPConn, buf []byte) bool {
	t.Helper()
	_ = udp.SetReadDeadline(time.Now().Add(time.Millisecond))
	n, _, err := udp.ReadFromUDP(buf)
	return err == nil && n > 0
}
