package testnet_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// roundTrip sends msg to the TCP service at addr, half-closes and reads to the end.
func roundTrip(t *testing.T, addr, msg string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the answer to %q: %v", msg, err)
	}
	return string(b)
}

func TestPair(t *testing.T) {
	a, b := testnet.Pair(t)
	if a.LocalAddr().String() != b.RemoteAddr().String() || b.LocalAddr().String() != a.RemoteAddr().String() {
		t.Fatalf("not one connection: %v→%v and %v→%v", a.LocalAddr(), a.RemoteAddr(), b.LocalAddr(), b.RemoteAddr())
	}
	_ = b.SetDeadline(time.Now().Add(10 * time.Second))
	go func() { _, _ = a.Write([]byte("ping")); _ = a.CloseWrite() }()
	got, err := io.ReadAll(b)
	if err != nil || string(got) != "ping" {
		t.Fatalf("read %q, %v; want \"ping\" and a clean end", got, err)
	}
}

func TestEchoAndUpper(t *testing.T) {
	if got := roundTrip(t, testnet.Echo(t), "hello"); got != "hello" {
		t.Errorf("Echo answered %q; want \"hello\"", got)
	}
	if got := roundTrip(t, testnet.Upper(t), "hello"); got != "HELLO" {
		t.Errorf("Upper answered %q; want \"HELLO\"", got)
	}
}

func TestStream(t *testing.T) {
	c, err := net.Dial("tcp", testnet.Stream(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if n, err := io.CopyN(io.Discard, c, 1<<20); err != nil {
		t.Fatalf("the stream ended after %d bytes: %v", n, err)
	}
}

// The test's end closes what Serve accepted: a handler blocked reading a
// connection the client never closes returns, and the client sees the end.
func TestServeClosesAtCleanup(t *testing.T) {
	started, returned := make(chan struct{}), make(chan struct{})
	var client net.Conn
	t.Run("inner", func(t *testing.T) {
		addr := testnet.Serve(t, func(c *net.TCPConn) {
			defer close(returned)
			close(started)
			_, _ = io.Copy(io.Discard, c)
		})
		var err error
		if client, err = net.Dial("tcp", addr); err != nil {
			t.Fatal(err)
		}
		select {
		case <-started:
		case <-time.After(10 * time.Second):
			t.Fatal("the handler did not get the connection within 10s")
		}
	})
	if client == nil {
		t.FailNow()
	}
	defer client.Close()
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler still runs 10s after its test ended")
	}
	_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := client.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("the client read %v after the service's test ended; want EOF", err)
	}
}

func TestAccept(t *testing.T) {
	addr, conns := testnet.Accept(t)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case s := <-conns:
		if s.RemoteAddr().String() != c.LocalAddr().String() {
			t.Fatalf("accepted %v; dialed from %v", s.RemoteAddr(), c.LocalAddr())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no connection accepted within 10s")
	}
}

func TestUDP(t *testing.T) {
	for name, tc := range map[string]struct {
		addr string
		want string
	}{
		"echo":  {testnet.EchoUDP(t), "datagram"},
		"upper": {testnet.UpperUDP(t), "DATAGRAM"},
	} {
		c, err := net.Dial("udp", tc.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		buf := make([]byte, 64)
		for try := 0; ; try++ { // loopback UDP may still drop a datagram
			_, _ = c.Write([]byte("datagram"))
			_ = c.SetReadDeadline(time.Now().Add(time.Second))
			n, err := c.Read(buf)
			if err == nil {
				if got := string(buf[:n]); got != tc.want {
					t.Errorf("%s answered %q; want %q", name, got, tc.want)
				}
				break
			}
			if try == 10 {
				t.Fatalf("%s: no answer in 10 tries: %v", name, err)
			}
		}
	}
}

func TestFreePort(t *testing.T) {
	for _, network := range []string{"tcp", "udp"} {
		p := testnet.FreePort(t, network)
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
		var err error
		if network == "tcp" {
			var ln net.Listener
			if ln, err = net.Listen(network, addr); err == nil {
				ln.Close()
			}
		} else {
			var pc net.PacketConn
			if pc, err = net.ListenPacket(network, addr); err == nil {
				pc.Close()
			}
		}
		if err != nil {
			t.Errorf("%s port %d is not free: %v", network, p, err)
		}
	}
	if p := testnet.FreePort(t, "tcp"); p == 0 {
		t.Error("FreePort returned port 0")
	}
	// Below the ephemeral range, where no ":0" bind or outgoing connection of
	// another process can take it before the test's server binds it.
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		var lo, hi int
		if _, err := fmt.Sscan(string(b), &lo, &hi); err == nil && lo >= 16384+1024 {
			for _, network := range []string{"tcp", "udp"} {
				if p := testnet.FreePort(t, network); p >= lo || p < lo-16384 {
					t.Errorf("FreePort(%s) = %d, inside the kernel's ephemeral range %d-%d or far below it", network, p, lo, hi)
				}
			}
		}
	}
	// Never the same port twice: a test that asks for a port to serve and one
	// that must differ from it got the same one (the kernel hands a port just
	// closed out again), and its refusal check then saw a registration pass.
	seen := map[int]bool{}
	for range 500 {
		p := testnet.FreePort(t, "tcp")
		if seen[p] {
			t.Fatalf("FreePort returned port %d twice", p)
		}
		seen[p] = true
	}
}

// ServeAt serves a loopback address other than 127.0.0.1 (the port of another
// service on 127.0.0.2), and the service's connections are its own.
func TestServeAt(t *testing.T) {
	echo := testnet.Echo(t)
	_, port, _ := net.SplitHostPort(echo)
	var n atomic.Int64
	addr := testnet.ServeAt(t, "127.0.0.2:"+port, func(*net.TCPConn) { n.Add(1) })
	if addr != "127.0.0.2:"+port {
		t.Fatalf("ServeAt listens on %s; want 127.0.0.2:%s", addr, port)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) || n.Load() != 1 {
		t.Fatalf("127.0.0.2 gave %v after %d connections; want EOF (closed by Serve) after 1", err, n.Load())
	}
	if got := roundTrip(t, echo, "x"); got != "x" || n.Load() != 1 {
		t.Fatalf("127.0.0.1 answered %q, 127.0.0.2 counted %d; want the echo's \"x\" and 1", got, n.Load())
	}
}
