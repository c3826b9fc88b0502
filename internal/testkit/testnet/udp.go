package testnet

import (
	"bytes"
	"net"
	"testing"
)

func listenUDP(t testing.TB) *net.UDPConn {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("testnet: listening on loopback UDP: %v", err)
	}
	return pc
}

// ServeUDP runs a loopback UDP service until the test ends and returns its
// address. Each datagram is handed to answer with its sender; what answer returns
// goes back to that sender, unless it is nil. p is reused for the next datagram:
// answer must copy what it keeps.
func ServeUDP(t testing.TB, answer func(p []byte, from net.Addr) []byte) string {
	t.Helper()
	pc := listenUDP(t)
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if reply := answer(buf[:n], from); reply != nil {
				_, _ = pc.WriteTo(reply, from)
			}
		}
	}()
	return pc.LocalAddr().String()
}

// EchoUDP runs a loopback UDP service that sends each datagram back to its sender.
func EchoUDP(t testing.TB) string {
	t.Helper()
	return ServeUDP(t, func(p []byte, _ net.Addr) []byte { return p })
}

// UpperUDP runs a loopback UDP service that answers each datagram with the
// datagram in upper case.
func UpperUDP(t testing.TB) string {
	t.Helper()
	return ServeUDP(t, func(p []byte, _ net.Addr) []byte { return bytes.ToUpper(p) })
}
