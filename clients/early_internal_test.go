package clients

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// earlyDialer is a QUIC Dialer for a real server that refuses the destination
// port denied (0: none), and a live connection to it: one dial to an allowed
// destination answered, so a destination known to be plain may get early bytes.
func earlyDialer(t *testing.T, denied int) *Dialer {
	t.Helper()
	d := StartTestServerQUIC(t, func(req authz.Request) authz.Decision {
		if req.Destination.Port == denied {
			return authz.Decision{Reason: "port " + strconv.Itoa(denied) + " is closed to " + req.Identity.String()}
		}
		return authz.Decision{Allow: true}
	})
	d.quicEarly.fresh = time.Hour // the test must not depend on how fast the machine is
	return d
}

// roundTripUpper sends chunks through c to a testnet.Upper destination, half-closes
// and returns the answer.
func roundTripUpper(t *testing.T, c net.Conn, chunks ...[]byte) string {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	for _, b := range chunks {
		if _, err := c.Write(b); err != nil {
			t.Fatalf("writing %d bytes: %v", len(b), err)
		}
	}
	if err := c.(wire.Stream).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	return string(got)
}

// TestDialEarlySendsWithHello: the first dial to a destination waits for the
// answer (the Dialer does not know yet whether it is a protected name); the next
// returns before the answer, and what is written at once (within the early
// budget, then beyond it) reaches the destination whole and in order.
func TestDialEarlySendsWithHello(t *testing.T) {
	t.Parallel()
	d := earlyDialer(t, 0)
	dst := testnet.Upper(t)
	ctx := context.Background()

	first, err := d.DialEarly(ctx, "tcp", dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := first.(*earlyTunnel); ok {
		t.Fatal("the first dial of a destination sent early bytes: it could have been a protected reverse name")
	}
	if got := roundTripUpper(t, first, []byte("first")); got != "FIRST" {
		t.Fatalf("first dial: got %q", got)
	}

	c, err := d.DialEarly(ctx, "tcp", dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*earlyTunnel); !ok {
		t.Fatalf("second dial of a plain destination returned %T; want an early tunnel", c)
	}
	big := bytes.Repeat([]byte("abcdefghij"), 4000) // 40000 bytes: beyond MaxEarlyData, waits for the answer
	got := roundTripUpper(t, c, []byte("hello "), []byte("world "), big)
	want := "HELLO WORLD " + strings.ToUpper(string(big))
	if got != want {
		t.Fatalf("early bytes arrived as %d bytes starting %.40q; want %d bytes starting %.40q", len(got), got, len(want), want)
	}
}

// TestDialEarlyRefusalReadable: a dial that sent early bytes and is refused by
// the policy reports the server's refusal, code and reason, from its first Read;
// the server never dialed the destination, so the bytes went nowhere; and the
// destination is no longer sent early bytes.
func TestDialEarlyRefusalReadable(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dst := ln.Addr().String()
	port := ln.Addr().(*net.TCPAddr).Port
	d := earlyDialer(t, port)
	ctx := context.Background()
	ok, err := d.DialEarly(ctx, "tcp", testnet.Upper(t)) // the connection is up and answering
	if err != nil {
		t.Fatal(err)
	}
	defer ok.Close()
	d.quicEarly.mu.Lock()
	d.quicEarly.plain[dst] = struct{}{} // as if dst had answered an ok before the policy changed
	d.quicEarly.mu.Unlock()

	c, err := d.DialEarly(ctx, "tcp", dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(*earlyTunnel); !ok {
		t.Fatalf("dial returned %T; want an early tunnel", c)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte("secret")); err != nil && !errors.As(err, new(*RefusedError)) {
		t.Fatalf("early write: %v", err)
	}
	_, err = c.Read(make([]byte, 16))
	var re *RefusedError
	want := "port " + strconv.Itoa(port) + " is closed to alice@laptop"
	if !errors.As(err, &re) || re.Code != wire.CodePolicyDenied || re.Reason != want {
		t.Fatalf("read after a refused early dial: %v; want a policy_denied refusal %q", err, want)
	}
	if _, err := c.Write([]byte("more")); !errors.As(err, &re) {
		t.Fatalf("write after the refusal: %v; want the refusal", err)
	}
	if d.quicEarly.allows(d.transport().LiveQUIC(), dst) {
		t.Fatal("a refused destination is still sent early bytes")
	}
	// The server refused before dialing: nothing connected to the destination.
	_ = ln.(*net.TCPListener).SetDeadline(time.Now())
	if conn, err := ln.Accept(); !errors.Is(err, os.ErrDeadlineExceeded) {
		if conn != nil {
			conn.Close()
		}
		t.Fatalf("the destination of a refused dial was connected to (accept: %v)", err)
	}
}

// TestDialEarlyDialFailed: a destination that stopped listening is refused with
// dial_refused and the server's reason, read from the early tunnel.
func TestDialEarlyDialFailed(t *testing.T) {
	t.Parallel()
	d := earlyDialer(t, 0)
	ctx := context.Background()
	// A port below the kernel's ephemeral range (testnet.FreeAddr): once
	// closed, a ":0" bind elsewhere cannot take it and answer the second dial.
	ln, err := net.Listen("tcp", testnet.FreeAddr(t, "tcp").String())
	if err != nil {
		t.Fatal(err)
	}
	dst := ln.Addr().String()
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	first, err := d.DialEarly(ctx, "tcp", dst)
	if err != nil {
		t.Fatal(err)
	}
	first.Close()
	ln.Close() // the destination goes away: the next dial is refused

	c, err := d.DialEarly(ctx, "tcp", dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(*earlyTunnel); !ok {
		t.Fatalf("dial returned %T; want an early tunnel", c)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	_, _ = c.Write([]byte("hello"))
	_, err = c.Read(make([]byte, 16))
	var re *RefusedError
	if !errors.As(err, &re) || re.Code != wire.CodeDialRefused || !strings.Contains(re.Reason, dst) {
		t.Fatalf("read: %v; want dial_refused naming %s", err, dst)
	}
}

// TestDialFirst: the bytes a forwarder already read from its local client go
// first, ahead of what is written later, both when they wait for the ok (the
// first dial) and when they travel with the hello.
func TestDialFirst(t *testing.T) {
	t.Parallel()
	d := earlyDialer(t, 0)
	dst := testnet.Upper(t)
	for i, wantEarly := range []bool{false, true} {
		c, err := d.DialFirst(context.Background(), "tcp", dst, []byte("first "))
		if err != nil {
			t.Fatal(err)
		}
		if _, early := c.(*earlyTunnel); early != wantEarly {
			t.Fatalf("dial %d returned %T; want early %v", i, c, wantEarly)
		}
		if got := roundTripUpper(t, c, []byte("then")); got != "FIRST THEN" {
			t.Fatalf("dial %d: got %q; want %q", i, got, "FIRST THEN")
		}
	}
	if _, err := d.DialFirst(context.Background(), "tcp", dst, make([]byte, wire.MaxEarlyData+1)); err == nil {
		t.Fatal("DialFirst took more first bytes than a request may carry")
	}
	if _, err := d.DialFirst(context.Background(), "udp", dst, []byte("datagram")); err == nil {
		t.Fatal("DialFirst took first bytes for a UDP flow")
	}
}

// TestReadReady: readReady returns what the peer already sent and never waits
// for more.
func TestReadReady(t *testing.T) {
	t.Parallel()
	a, b := testnet.Pair(t)
	if got := readReady(b); got != nil {
		t.Fatalf("readReady with nothing sent = %q; want nothing", got)
	}
	if _, err := a.Write([]byte("ssh-2.0")); err != nil {
		t.Fatal(err)
	}
	var got []byte
	for deadline := time.Now().Add(10 * time.Second); got == nil && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond) // the bytes are on their way through loopback
		got = readReady(b)
	}
	if string(got) != "ssh-2.0" {
		t.Fatalf("readReady = %q; want %q", got, "ssh-2.0")
	}
}

// syncBuffer is a log destination the test reads while the forwarder writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestForwarderEarlyRefusal: a forwarded connection whose first bytes went with
// the request and that the server refused is closed, and the forwarder logs the
// server's reason, as for a refusal that came before any byte was sent.
func TestForwarderEarlyRefusal(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dst := ln.Addr().String()
	d := earlyDialer(t, ln.Addr().(*net.TCPAddr).Port)
	up, err := d.DialEarly(context.Background(), "tcp", testnet.Upper(t)) // the connection is up and answering
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	d.quicEarly.mu.Lock()
	d.quicEarly.plain[dst] = struct{}{}
	d.quicEarly.mu.Unlock()

	var logs syncBuffer
	f := &Forwarder{DialFirst: d.DialFirst, Target: dst, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	fln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Serve(ctx, fln) }()
	defer func() { cancel(); <-done }()

	c, err := net.Dial("tcp", fln.Addr().String())
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		// The refusal came back, and reset the local connection, before this
		// side saw its connect complete: the refused tunnel's end, only sooner.
	case err != nil:
		t.Fatal(err)
	default:
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		_, _ = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
		if n, err := c.Read(make([]byte, 16)); err == nil {
			t.Fatalf("the local client of a refused tunnel read %d bytes", n)
		}
	}
	want := "port " + strconv.Itoa(ln.Addr().(*net.TCPAddr).Port) + " is closed to alice@laptop"
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(logs.String(), "forward failed"); {
		if time.Now().After(deadline) {
			t.Fatalf("no forward failed line; log:\n%s", logs.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if log := logs.String(); !strings.Contains(log, want) {
		t.Fatalf("the log does not give the server's reason %q:\n%s", want, log)
	}
}
