//go:build unix

package tpd

import (
	"errors"
	"net"
	"syscall"
	"testing"
)

// pending reports whether a datagram waits in udp's receive queue, without
// waiting for one (a read deadline in the past would not even look).
func pending(t *testing.T, udp *net.UDPConn, buf []byte) bool {
	t.Helper()
	rc, err := udp.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		n, _, rerr = syscall.Recvfrom(int(fd), buf, syscall.MSG_DONTWAIT)
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if rerr != nil && !errors.Is(rerr, syscall.EAGAIN) {
		t.Fatalf("looking at the QUIC socket's queue: %v", rerr)
	}
	return rerr == nil && n > 0
}
