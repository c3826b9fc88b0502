package testnet_test

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// The first connect to a stalled address completes (it fills the queue); the
// next ones hang until their own deadline.
func TestStalled(t *testing.T) {
	addr := testnet.Stalled(t)
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatalf("the first connect: %v; want it to complete", err)
	}
	defer c.Close()
	for range 3 {
		c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		if err == nil {
			c.Close()
			t.Fatal("a connect beyond the stalled listener's queue completed; want it to hang")
		}
		if ne := net.Error(nil); !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("a connect beyond the queue failed with %v; want it to hang until its deadline", err)
		}
	}
}
