package tpd

import (
	"errors"
	"net"
	"syscall"
	"testing"
)

// With port 0 and QUIC on, the UDP side of the chosen port stays tpd's from
// Listen to Serve: another program binding it in between (as another test's
// socket once did while tpd loaded its CA) gets EADDRINUSE, and Serve's QUIC
// gets the same socket. Bad input: a second program asking for that UDP port.
func TestListenHoldsTheUDPPort(t *testing.T) {
	t.Parallel()
	ln, err := Listen("127.0.0.1:0", true)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	other, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err == nil {
		other.Close()
		t.Fatalf("another program could bind UDP port %d between Listen and Serve; QUIC would then fail to start", port)
	}
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("binding the reserved UDP port: %v; want EADDRINUSE", err)
	}
	udp, err := listenQUIC(ln)
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	if got := udp.LocalAddr().(*net.UDPAddr).Port; got != port {
		t.Fatalf("QUIC got UDP port %d; want the TCP port %d", got, port)
	}
	// Closing the listener after Serve took the socket leaves QUIC's open.
	ln.Close()
	if _, err := udp.WriteToUDP([]byte("x"), udp.LocalAddr().(*net.UDPAddr)); err != nil {
		t.Fatalf("QUIC's socket was closed with the listener: %v", err)
	}
}
