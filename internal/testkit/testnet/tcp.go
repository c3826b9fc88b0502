package testnet

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/lib/ephemeral"
)

// acceptWithin bounds how long Pair waits for its own dial to be accepted.
const acceptWithin = 10 * time.Second

func listenTCP(t testing.TB) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("testnet: listening on loopback TCP: %v", err)
	}
	return ln
}

// Pair returns the two ends of one loopback TCP connection: the end that dialed
// and the end that was accepted. Both are closed when the test ends.
func Pair(t testing.TB) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln := listenTCP(t)
	defer ln.Close()
	if err := ln.SetDeadline(time.Now().Add(acceptWithin)); err != nil {
		t.Fatalf("testnet: %v", err)
	}
	type result struct {
		c   *net.TCPConn
		err error
	}
	res := make(chan result, 1)
	go func() {
		c, err := ln.AcceptTCP()
		res <- result{c, err}
	}()
	dialed, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatalf("testnet: dialing loopback TCP: %v", err)
	}
	r := <-res // bounded by the listener's deadline
	if r.err != nil {
		dialed.Close()
		t.Fatalf("testnet: accepting loopback TCP: %v", r.err)
	}
	t.Cleanup(func() { dialed.Close(); r.c.Close() })
	return dialed, r.c
}

// Serve runs a loopback TCP service until the test ends and returns its
// address. Each connection is handed to handle in a goroutine of its own and
// closed when handle returns; connections still open when the test ends are
// closed then, which ends any handler blocked on one.
func Serve(t testing.TB, handle func(c *net.TCPConn)) string {
	t.Helper()
	return serve(t, listenTCP(t), handle)
}

// ServeAt is Serve on a loopback address the test chooses, such as
// 127.0.0.2 and the port of another service; any other address fails the test.
func ServeAt(t testing.TB, addr string, handle func(c *net.TCPConn)) string {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().IsLoopback() {
		t.Fatalf("testnet: ServeAt(%q): want a loopback IP address and a port (%v)", addr, err)
	}
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap))
	if err != nil {
		t.Fatalf("testnet: listening on %s: %v", addr, err)
	}
	return serve(t, ln, handle)
}

func serve(t testing.TB, ln *net.TCPListener, handle func(c *net.TCPConn)) string {
	var mu sync.Mutex
	open := map[*net.TCPConn]struct{}{}
	ended := false
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		ended = true
		for c := range open {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			mu.Lock()
			if ended {
				mu.Unlock()
				c.Close()
				return
			}
			open[c] = struct{}{}
			mu.Unlock()
			go func() {
				defer func() {
					mu.Lock()
					delete(open, c)
					mu.Unlock()
					c.Close()
				}()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}

// Accept runs a loopback TCP service whose connections the test handles itself:
// each accepted connection is sent on the channel (which holds 16) and stays
// open until the test closes it or ends.
func Accept(t testing.TB) (string, <-chan *net.TCPConn) {
	t.Helper()
	ctx := t.Context() // done just before the test's cleanups run
	conns := make(chan *net.TCPConn, 16)
	addr := Serve(t, func(c *net.TCPConn) {
		select {
		case conns <- c:
			<-ctx.Done()
		case <-ctx.Done():
		}
	})
	return addr, conns
}

// Echo runs a loopback TCP service that sends back what it reads; after the
// client's end of input it half-closes, so a client reading to EOF gets all of
// its bytes back and then a clean end.
func Echo(t testing.TB) string {
	t.Helper()
	return Serve(t, func(c *net.TCPConn) {
		_, _ = io.Copy(c, c)
		_ = c.CloseWrite()
		_, _ = io.Copy(io.Discard, c)
	})
}

// Upper runs a loopback TCP service that reads each connection to the client's
// end of input and only then answers with what it read in upper case: a reply
// arrives only after the client half-closed.
func Upper(t testing.TB) string {
	t.Helper()
	return Serve(t, func(c *net.TCPConn) {
		b, _ := io.ReadAll(c)
		_, _ = c.Write(bytes.ToUpper(b))
	})
}

// Stream runs a loopback TCP service that writes zero bytes to each connection
// until writing fails: a transfer that never ends by itself.
func Stream(t testing.TB) string {
	t.Helper()
	return Serve(t, func(c *net.TCPConn) { WriteForever(c) })
}

// WriteForever writes zero bytes to c until writing fails, for a handler of
// Serve that does more once the stream has been cut.
func WriteForever(c net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

// FreePort returns a loopback port ("tcp" or "udp") that was free a moment ago:
// for a server the test starts later, or as an address nothing listens on. It
// never returns a port it returned before in this process: the kernel may hand
// a port just closed out again, and a test that asked for two ports (one to
// serve, one that must differ) would then get the same one twice.
//
// The port comes from below the kernel's ephemeral range
// (net.ipv4.ip_local_port_range), picked at random: a port the kernel handed
// out for ":0" would go to the next socket that binds ":0" or connects
// anywhere, and on a loaded machine running several test processes one of
// them took it before the test's server bound it. Below that range only an
// explicit bind can take it: another test process's FreePort choosing the same
// port in the same moment.
//
// Network "tcp+udp" is a port free on both, for a server that listens on
// both (tpd with QUIC), as a test that restarts it on the same address needs.
func FreePort(t testing.TB, network string) int {
	t.Helper()
	if network != "tcp" && network != "udp" && network != "tcp+udp" {
		t.Fatalf("testnet: FreePort of network %q; want \"tcp\", \"udp\" or \"tcp+udp\"", network)
	}
	lo, hi := fixedRange()
	for range 1000 {
		port := 0
		if hi > lo {
			port = lo + rand.IntN(hi-lo)
		}
		if network == "tcp+udp" {
			if port == 0 {
				t.Fatal("testnet: FreePort of tcp+udp needs the range below the kernel's ephemeral ports, and this machine leaves none")
			}
			if _, ok := bindFree("tcp", port); !ok {
				continue
			}
			if _, ok := bindFree("udp", port); ok && handedOut("tcp", port) && handedOut("udp", port) {
				return port
			}
			continue
		}
		port, ok := bindFree(network, port)
		if ok && handedOut(network, port) {
			return port
		}
	}
	t.Fatalf("testnet: no free %s port in 1000 tries", network)
	return 0
}

// fixedRange is the range of ports FreePort picks from: the 16384 below the
// kernel's ephemeral range, or none (lo == hi: the kernel picks) when that
// range starts too low to leave them.
var fixedRange = sync.OnceValues(func() (lo, hi int) {
	eph, ok := ephemeral.Start()
	if !ok || eph < 16384+1024 {
		return 0, 0
	}
	return eph - 16384, eph
})

// bindFree binds network's loopback port (0: one the kernel picks) and
// releases it, and says which port it was and whether the bind succeeded.
func bindFree(network string, port int) (int, bool) {
	if network == "tcp" {
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
		if err != nil {
			return 0, false
		}
		defer ln.Close()
		return ln.Addr().(*net.TCPAddr).Port, true
	}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		return 0, false
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).Port, true
}

var (
	handedMu sync.Mutex
	handed   = map[string]bool{} // "tcp/8080": FreePort returned it
)

// handedOut records that FreePort returns network's port, unless it did before.
func handedOut(network string, port int) bool {
	handedMu.Lock()
	defer handedMu.Unlock()
	k := network + "/" + strconv.Itoa(port)
	if handed[k] {
		return false
	}
	handed[k] = true
	return true
}

// FreeAddr is FreePort as a loopback address: 127.0.0.1 and the port.
func FreeAddr(t testing.TB, network string) netip.AddrPort {
	t.Helper()
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(FreePort(t, network)))
}
