package testnet_test

import (
	"errors"
	"net"
	"syscall"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// A Refusing address refuses every TCP connect while the test runs, and its
// UDP port is held too.
func TestRefusing(t *testing.T) {
	addr := testnet.Refusing(t)
	for range 3 {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			t.Fatalf("a connect to the refusing address %s succeeded", addr)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("a connect to the refusing address %s failed with %v; want connection refused", addr, err)
		}
	}
	if pc, err := net.ListenPacket("udp4", addr); err == nil {
		pc.Close()
		t.Fatalf("another socket could bind UDP %s while the refusing address holds it", addr)
	}
}
