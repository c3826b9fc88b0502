//go:build linux

package wire

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// resetAfter has peer write data and reset; then a write on c takes the
// reset (ECONNRESET), as a bridge's other direction may, and returns c's
// buffered bytes unread.
func resetAfter(t *testing.T, c, peer *net.TCPConn, data []byte) {
	t.Helper()
	if _, err := peer.Write(data); err != nil {
		t.Fatal(err)
	}
	_ = peer.SetLinger(0)
	peer.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := c.Write([]byte{1}); errors.Is(err, syscall.ECONNRESET) {
			return
		} else if err != nil {
			t.Fatalf("the write after the peer's reset failed with %v, not ECONNRESET", err)
		}
		if time.Now().After(deadline) {
			t.Fatal("the peer's reset never reached the socket")
		}
		time.Sleep(time.Millisecond) // until the reset has arrived, bounded by the deadline
	}
}

// Linux reports a reset once: after a write took it, the read returns the
// buffered bytes and then a plain end of stream. resetByPeer tells that end
// from a peer's close.
func TestResetByPeerAfterTheWriteTookTheError(t *testing.T) {
	c, peer := testnet.Pair(t)
	data := bytes.Repeat([]byte("d"), 1000)
	resetAfter(t, c, peer, data)
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes and %v; want the %d buffered and a plain end (how Linux reports a reset taken by a write)", len(got), err, len(data))
	}
	if !resetByPeer(c) {
		t.Fatal("a connection its peer reset is not told apart from one it closed")
	}

	c2, peer2 := testnet.Pair(t)
	peer2.Write(data)
	peer2.Close()
	if got, err := io.ReadAll(c2); err != nil || len(got) != len(data) {
		t.Fatalf("read %d bytes and %v after the peer's close", len(got), err)
	}
	if resetByPeer(c2) {
		t.Fatal("a connection its peer closed is taken for one it reset")
	}
}

// A bridge whose source was reset, the reset taken by a write, passes an
// abort on, not a clean end: the other side sees a reset after the bytes.
func TestBridgePassesOnAResetAWriteTook(t *testing.T) {
	service, servicePeer := testnet.Pair(t)
	public, client := testnet.Pair(t)
	data := bytes.Repeat([]byte("r"), 64<<10)
	resetAfter(t, service, servicePeer, data)
	done := make(chan error, 1)
	go func() { _, _, err := Bridge(context.Background(), public, service); done <- err }()
	_ = client.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(client)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the other side read %d bytes and then %v; want a connection reset, not a clean end", len(got), err)
	}
	if err := <-done; err == nil {
		t.Fatal("Bridge reported a clean end of a session whose source was reset")
	}
}
