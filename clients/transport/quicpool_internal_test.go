package transport

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
)

// quicPoolEnv runs a real proxy.Server over QUIC on loopback that lets one
// connection carry maxStreams streams, and returns a QUIC-only Client for it
// and an echo service.
func quicPoolEnv(t *testing.T, maxStreams int64) (*Client, string) {
	t.Helper()
	var quicAddr string
	_, cfg := startServer(t, &quicAddr, proxy.QUICOptions{MaxStreams: maxStreams})
	d := &Client{Server: quicAddr, Transport: QUIC, Timeout: 20 * time.Second, TLSConfig: cfg}
	t.Cleanup(func() { _ = d.Close() })
	return d, testnet.Echo(t)
}

// openEchoed opens a tunnel to echo and proves it with one byte each way.
func openEchoed(t *testing.T, d *Client, echo string) net.Conn {
	t.Helper()
	c, err := dialEcho(context.Background(), d, echo)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	b := []byte{'x'}
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatal(err)
	}
	return c
}

// Bad input: 12 tunnels at once where the server allows 5 streams per QUIC
// connection. They ride on exactly three connections (new requests fill the
// first with room); once they end, the two further connections close after the
// pool's idle time and the shared one stays.
func TestQUICPoolGrowsAndShrinks(t *testing.T) {
	t.Parallel()
	d, echo := quicPoolEnv(t, 5)
	d.quic.mu.Lock()
	d.quic.poolIdle = 50 * time.Millisecond
	d.quic.mu.Unlock()
	var conns []net.Conn
	for range 12 {
		conns = append(conns, openEchoed(t, d, echo))
	}
	if got := d.QUICConns(); got != 3 {
		t.Fatalf("12 tunnels at 5 streams per connection hold %d QUIC connections; want 3", got)
	}
	d.quic.mu.Lock()
	shared := d.quic.conn
	d.quic.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
	deadline := time.Now().Add(20 * time.Second)
	for d.QUICConns() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("20s after its tunnels ended the Client still holds %d QUIC connections; want the shared one only", d.QUICConns())
		}
		time.Sleep(10 * time.Millisecond) // polling for the idle close, bounded by the deadline
	}
	// One tunnel now rides the shared connection alone, once the server's
	// MAX_STREAMS for the five streams that ended on it has arrived: until
	// then the Client rightly opens a further connection rather than wait,
	// and under load that frame can come after the further connections'
	// 50 ms idle close. Quic-go does not show a connection's stream credit,
	// so a tunnel that had to take a further connection is closed and tried
	// again once that connection is gone.
	deadline = time.Now().Add(20 * time.Second)
	for {
		c := openEchoed(t, d, echo)
		got := d.QUICConns()
		d.quic.mu.Lock()
		same := d.quic.conn == shared
		d.quic.mu.Unlock()
		if !same {
			t.Fatal("the shared QUIC connection was replaced while the pool shrank; want it kept")
		}
		if got == 1 {
			_ = c.Close()
			return
		}
		_ = c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("20s after the pool shrank, one tunnel still holds %d QUIC connections; want 1 (the shared one)", got)
		}
		for d.QUICConns() != 1 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond) // polling for the further connection's idle close, bounded by the deadline
		}
	}
}

// Bad input: an 11th tunnel when MaxQUICConns 2 connections of 5 streams are
// full. It waits for a stream to end rather than opening a third connection,
// fails readably when none ends within its timeout, and succeeds once one does.
func TestQUICPoolBoundWaits(t *testing.T) {
	t.Parallel()
	d, echo := quicPoolEnv(t, 5)
	d.MaxQUICConns = 2
	var conns []net.Conn
	for range 10 {
		conns = append(conns, openEchoed(t, d, echo))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond) // a deliberate deadline for the refused wait
	_, err := dialEcho(ctx, d, echo)
	cancel()
	if err == nil || !strings.Contains(err.Error(), "every QUIC stream the server allows on 2 connections is in use") {
		t.Fatalf("11th tunnel with both connections full: %v; want the wait's readable failure", err)
	}
	if got := d.QUICConns(); got != 2 {
		t.Fatalf("the Client holds %d QUIC connections; want MaxQUICConns 2", got)
	}
	_ = conns[0].Close()
	c := openEchoed(t, d, echo)
	defer c.Close()
	for _, c := range conns[1:] {
		_ = c.Close()
	}
}
