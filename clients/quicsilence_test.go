package clients_test

import (
	"context"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// A TP server whose first answer comes only after several seconds of silence
// is still reached within the dial's Timeout. The bad input: a path that loses
// every packet of the first 6 s, as a busy server's full socket buffer or a
// congested link does. The QUIC handshake waits as long as the whole setup may
// take, not quic-go's 5 s of silence.
func TestQUICHandshakeOutlastsSilence(t *testing.T) {
	t.Parallel()
	d := clients.StartTestServerQUIC(t, func(authz.Request) authz.Decision { return authz.Decision{Allow: true} })
	d.QUICServer = silentFirst(t, d.QUICServer, 6*time.Second)
	d.Timeout = 40 * time.Second
	echo := testnet.Echo(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", echo)
	if err != nil {
		t.Fatalf("dialing through a server silent for its first 6 s, with a 40 s Timeout: %v", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("late but there")); err != nil {
		t.Fatal(err)
	}
	_ = c.(interface{ CloseWrite() error }).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "late but there" {
		t.Fatalf("echo through the late server: %q, %v", got, err)
	}
}

// silentFirst is a UDP relay to server that drops every packet in both
// directions until silence has passed since the first packet it saw, and
// relays them after. It serves one client.
func silentFirst(t *testing.T, server string, silence time.Duration) string {
	t.Helper()
	front, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	back, err := net.Dial("udp", server)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu     sync.Mutex
		client net.Addr
		open   time.Time // when packets start to pass
	)
	passing := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return !open.IsZero() && time.Now().After(open)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		buf := make([]byte, 65536)
		for {
			n, from, err := front.ReadFrom(buf)
			if err != nil {
				return
			}
			mu.Lock()
			client = from
			if open.IsZero() {
				open = time.Now().Add(silence)
			}
			mu.Unlock()
			if passing() {
				_, _ = back.Write(buf[:n])
			}
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 65536)
		for {
			n, err := back.Read(buf)
			if err != nil {
				return
			}
			mu.Lock()
			to := client
			mu.Unlock()
			if to != nil && passing() {
				_, _ = front.WriteTo(buf[:n], to)
			}
		}
	}()
	t.Cleanup(func() { front.Close(); back.Close(); wg.Wait() })
	return front.LocalAddr().String()
}
