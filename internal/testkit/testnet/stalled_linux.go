package testnet

import (
	"syscall"
	"testing"
)

// Stalled returns a loopback TCP address whose connects hang: its listener
// never accepts and its accept queue holds one connection, so the first
// connect completes and every later one waits (Linux drops a SYN to a
// listener whose queue is full; the connect retries until its own timeout).
// It stands for a service too busy to take connections.
func Stalled(t testing.TB) string {
	t.Helper()
	ln := listenTCP(t)
	t.Cleanup(func() { ln.Close() })
	raw, err := ln.SyscallConn()
	if err != nil {
		t.Fatalf("testnet: %v", err)
	}
	var lerr error
	// Listening again on a listening socket sets its backlog (Linux).
	if err := raw.Control(func(fd uintptr) { lerr = syscall.Listen(int(fd), 0) }); err != nil || lerr != nil {
		t.Fatalf("testnet: setting the backlog of a stalled listener: %v %v", err, lerr)
	}
	return ln.Addr().String()
}
