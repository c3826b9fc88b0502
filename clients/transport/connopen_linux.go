package transport

import (
	"crypto/tls"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// ConnOpen reports whether a TLS connection's TCP connection (a spare kept
// for a later request) is still established: no FIN and no reset has come
// from the server since the handshake, as one does when tpd restarts, shuts
// down or gives up waiting for a hello. known is false where the state cannot be read.
func ConnOpen(conn *tls.Conn) (open, known bool) {
	c := conn.NetConn()
	for {
		u, ok := c.(interface{ Unwrap() net.Conn })
		if !ok {
			break
		}
		c = u.Unwrap()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false, false
	}
	var info *unix.TCPInfo
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil || ierr != nil {
		return false, false
	}
	return info.State == unix.BPF_TCP_ESTABLISHED, true
}
