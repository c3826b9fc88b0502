package transport

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
)

// spareEnv runs a proxy.Server and an echo service on loopback; the Client uses TLS.
func spareEnv(t *testing.T) (*Client, string) {
	t.Helper()
	addr, tlsConfig := startServer(t, nil, proxy.QUICOptions{})
	echo := testnet.Echo(t)
	d := &Client{Server: addr, Transport: TLS, Timeout: 10 * time.Second, TLSConfig: tlsConfig, NoTLSMux: true} // spares are for a connection per tunnel
	// A burst and a spare's life are measured on the clock: on a loaded
	// machine a dial (or a spare's handshake) can take longer than the
	// default 3 s, which these tests are not about.
	d.spare.maxAge, d.spare.window = time.Minute, time.Minute
	t.Cleanup(func() { _ = d.Close() })
	return d, echo
}

func echoOnce(t *testing.T, d *Client, addr string) net.Conn {
	t.Helper()
	c, err := dialEcho(context.Background(), d, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	if _, err := c.Write([]byte{'x'}); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'x' {
		t.Fatalf("echo: %q, %v", b[:], err)
	}
	return c
}

// waitSpare polls until the Client holds a spare connection and returns it.
func waitSpare(t *testing.T, d *Client) *tls.Conn {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		d.spare.mu.Lock()
		var c *tls.Conn
		if len(d.spare.conns) > 0 {
			c = d.spare.conns[0].conn
		}
		d.spare.mu.Unlock()
		if c != nil {
			return c
		}
	}
	t.Fatal("no spare connection was made during a burst of dials")
	return nil
}

// In a burst of dials over TLS the next session starts on the spare connection.
func TestSpareTLSUsedInBurst(t *testing.T) {
	t.Parallel()
	d, echo := spareEnv(t)
	echoOnce(t, d, echo)
	d.spare.mu.Lock()
	none := len(d.spare.conns) == 0 && !d.spare.filling
	d.spare.mu.Unlock()
	if !none {
		t.Fatal("a single dial made a spare connection")
	}
	echoOnce(t, d, echo) // the second dial within spareWindow starts a burst
	sp := waitSpare(t, d)
	if c := echoOnce(t, d, echo); c != net.Conn(sp) {
		t.Fatal("the dial did not use the spare connection")
	}
	waitSpare(t, d)
	_ = d.Close()
	d.spare.mu.Lock()
	gone := len(d.spare.conns) == 0
	d.spare.mu.Unlock()
	if !gone {
		t.Fatal("Close kept the spare connection")
	}
}

// A spare the server has closed costs a retry on a new connection, not the dial.
func TestSpareTLSDeadIsRetried(t *testing.T) {
	t.Parallel()
	d, echo := spareEnv(t)
	echoOnce(t, d, echo)
	echoOnce(t, d, echo)
	sp := waitSpare(t, d)
	_ = sp.NetConn().Close()
	if c := echoOnce(t, d, echo); c == net.Conn(sp) {
		t.Fatal("the dial returned the dead spare")
	}
}

// spareConns returns the Client's spare connections, oldest first.
func spareConns(d *Client) []*tls.Conn {
	d.spare.mu.Lock()
	defer d.spare.mu.Unlock()
	var cs []*tls.Conn
	for _, c := range d.spare.conns {
		cs = append(cs, c.conn)
	}
	return cs
}

// With Spares 2 (an agent's default) a burst leaves two handshaken connections
// ready; a session takes the oldest, and the Client makes one more afterwards.
// Bad input: a spare older than spareMaxAge (the server may have closed it for
// its missing hello) is discarded, never used.
func TestSparesKeepsTwo(t *testing.T) {
	t.Parallel()
	d, echo := spareEnv(t)
	d.Spares = 2
	echoOnce(t, d, echo)
	echoOnce(t, d, echo) // a burst
	waitSpares := func(n int) []*tls.Conn {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) { // polling, bounded
			if cs := spareConns(d); len(cs) == n {
				return cs
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d spare connections; want %d", len(spareConns(d)), n)
			}
		}
	}
	cs := waitSpares(2)
	if c := echoOnce(t, d, echo); c != net.Conn(cs[0]) {
		t.Fatal("the dial did not take the oldest spare")
	}
	if got := waitSpares(2); got[0] != cs[1] {
		t.Fatal("the second spare was not kept for the next dial")
	}

	d.spare.mu.Lock()
	old := d.spare.conns[0].conn
	d.spare.conns[0].made = time.Now().Add(-2 * d.spare.maxAgeOr())
	d.spare.mu.Unlock()
	if c := echoOnce(t, d, echo); c == net.Conn(old) {
		t.Fatal("the dial used a spare older than spareMaxAge")
	}
	_ = old.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := old.Read(make([]byte, 1)); err == nil {
		t.Fatal("the stale spare was not closed")
	}
}
