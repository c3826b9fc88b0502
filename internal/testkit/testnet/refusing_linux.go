package testnet

import (
	"net"
	"strconv"
	"syscall"
	"testing"
)

// Refusing returns a loopback address where nothing listens, for as long as
// the test runs: a TCP socket bound to it that does not listen holds the TCP
// port, so every connect is refused (a RST), and a UDP socket that reads
// nothing holds the same UDP port, so a QUIC attempt meets silence. No other
// test can take either port in the meantime, as it could one that FreePort
// found free.
func Refusing(t testing.TB) string {
	t.Helper()
	for range 20 {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatalf("testnet: %v", err)
		}
		if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			syscall.Close(fd)
			t.Fatalf("testnet: binding a refusing port: %v", err)
		}
		sa, err := syscall.Getsockname(fd)
		if err != nil {
			syscall.Close(fd)
			t.Fatalf("testnet: %v", err)
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
		pc, err := net.ListenPacket("udp4", addr)
		if err != nil { // another socket has that UDP port: try another
			syscall.Close(fd)
			continue
		}
		t.Cleanup(func() { syscall.Close(fd); pc.Close() })
		return addr
	}
	t.Fatal("testnet: no loopback port was free for TCP and UDP at once in 20 tries")
	return ""
}
