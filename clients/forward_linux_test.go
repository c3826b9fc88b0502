package clients

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// TestListenForwardKeepAlive: `tp forward`'s listener accepts a connection
// from a loopback address without TCP keepalive probes (four system calls a
// new tunnel saves); `tp expose`'s agent connects to its local service the
// same way.
func TestListenForwardKeepAlive(t *testing.T) {
	t.Parallel()
	accepted, dialed := keepAlives(t, "127.0.0.1")
	if accepted != 0 || dialed != 0 {
		t.Errorf("on 127.0.0.1, SO_KEEPALIVE is %d on the forwarder's accepted connection and %d on the agent's connection to its service, want 0 and 0 (no probes to a local peer)", accepted, dialed)
	}
}

// TestListenForwardKeepAliveElsewhere: a connection from any other address
// than a loopback one keeps Go's default probes (15 s), on the listener's and
// on the agent's side. The other address is one of the test's own network
// namespace, on its loopback device but not a loopback address.
func TestListenForwardKeepAliveElsewhere(t *testing.T) {
	const addr = "10.9.8.1"
	t.Parallel()
	if !testnet.InNetns(t, addr+"/32") {
		return
	}
	accepted, dialed := keepAlives(t, addr)
	if accepted != 1 || dialed != 1 {
		t.Fatalf("on %s, SO_KEEPALIVE is %d on the forwarder's accepted connection and %d on the agent's connection to its service, want 1 and 1 (probes to a peer elsewhere)", addr, accepted, dialed)
	}
}

// keepAlives listens with ListenForward on host and connects from host, then
// connects there as the agent's startLocalDial does, and returns both
// sockets' SO_KEEPALIVE: the one ListenForward accepted and the one
// startLocalDial made (TCP_KEEPIDLE checked where on).
func keepAlives(t *testing.T, host string) (accepted, dialed int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ln, err := ListenForward(ctx, net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	d, err := startLocalDial(ctx, "tcp", ln.Addr().String()).take()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	return keepAlive(t, a), keepAlive(t, d)
}

// keepAlive returns c's SO_KEEPALIVE, with its TCP_KEEPIDLE checked when on.
func keepAlive(t *testing.T, c net.Conn) int {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var on, idle int
	var gerr error
	if err := raw.Control(func(fd uintptr) {
		if on, gerr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE); gerr == nil {
			idle, gerr = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE)
		}
	}); err != nil || gerr != nil {
		t.Fatal(err, gerr)
	}
	if on == 1 && idle != 15 {
		t.Errorf("keepalive probes on %s start after %d s idle, want Go's default 15", c.LocalAddr(), idle)
	}
	return on
}
