package clients

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// tlsEarlyDialer is a TLS Dialer for a real server that refuses the
// destination port denied (0: none).
func tlsEarlyDialer(t *testing.T, denied int) *Dialer {
	t.Helper()
	addr, cfg := StartTestServer(t, func(req authz.Request) authz.Decision {
		if req.Destination.Port == denied {
			return authz.Decision{Reason: "port " + strconv.Itoa(denied) + " is closed to " + req.Identity.String()}
		}
		return authz.Decision{Allow: true}
	})
	d := &Dialer{Server: addr, Transport: TransportTLS, Timeout: 10 * time.Second, TLSConfig: cfg}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// Over TLS as over QUIC, the first dial of a destination waits for the answer
// (it might be a protected reverse name); the next sends its first bytes with
// the hello, on a connection known to be open, and they reach the destination
// whole and in order, followed by what was written after the answer.
func TestDialFirstTLSSendsWithHello(t *testing.T) {
	t.Parallel()
	d := tlsEarlyDialer(t, 0)
	dst := testnet.Upper(t)
	ctx := context.Background()

	first, err := d.DialFirst(ctx, "tcp", dst, []byte("one "))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := first.(*earlyTunnel); ok {
		t.Fatal("the first dial of a destination sent early bytes: it could have been a protected reverse name")
	}
	if got := roundTripUpper(t, first, []byte("first")); got != "ONE FIRST" {
		t.Fatalf("first dial: got %q", got)
	}

	c, err := d.DialFirst(ctx, "tcp", dst, []byte("two "))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*earlyTunnel); !ok {
		t.Fatalf("second dial of a plain destination returned %T; want an early tunnel", c)
	}
	big := bytes.Repeat([]byte("abcdefghij"), 4000) // beyond MaxEarlyData: waits for the answer
	got := roundTripUpper(t, c, []byte("hello "), big)
	want := "TWO HELLO " + strings.ToUpper(string(big))
	if got != want {
		t.Fatalf("early bytes arrived as %d bytes starting %.40q; want %d bytes starting %.40q", len(got), got, len(want), want)
	}
}

// Bad input: a destination the policy refuses now, after an earlier ok made it
// known as plain. The dial that sent early bytes over TLS reads the server's
// refusal, code and reason, from its first Read; the server never dialed the
// destination; and the destination gets no early bytes any more.
func TestDialEarlyTLSRefusalReadable(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dst := ln.Addr().String()
	port := ln.Addr().(*net.TCPAddr).Port
	d := tlsEarlyDialer(t, port)
	d.tlsEarly.answered(nil, dst, wire.ServerHello{OK: true}) // as if dst had answered an ok before the policy changed

	c, err := d.DialFirst(context.Background(), "tcp", dst, []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(*earlyTunnel); !ok {
		t.Fatalf("dial returned %T; want an early tunnel", c)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	_, err = c.Read(make([]byte, 16))
	var re *RefusedError
	want := "port " + strconv.Itoa(port) + " is closed to alice@laptop"
	if !errors.As(err, &re) || re.Code != wire.CodePolicyDenied || re.Reason != want {
		t.Fatalf("read after a refused early dial: %v; want a policy_denied refusal %q", err, want)
	}
	if d.tlsEarly.plainDest(dst) {
		t.Fatal("a refused destination is still sent early bytes")
	}
	_ = ln.(*net.TCPListener).SetDeadline(time.Now())
	if conn, err := ln.Accept(); !errors.Is(err, os.ErrDeadlineExceeded) {
		if conn != nil {
			conn.Close()
		}
		t.Fatalf("the destination of a refused dial was connected to (accept: %v)", err)
	}
}

// A forwarder over TLS whose tunnels send their first bytes with the hello
// moves a stream whole, through a half-close: 64 MiB of random bytes go to an
// echo service, the local client half-closes, and reads back exactly what it
// sent (SHA-256) before the end. Once its answer is in, the early tunnel is
// read as any TLS tunnel is (wire.Settler: a one-byte wait, no buffer of
// Bridge's own while idle).
func TestForwarderTLSEarlyStreamAndHalfClose(t *testing.T) {
	t.Parallel()
	d := tlsEarlyDialer(t, 0)
	echo := testnet.Echo(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	f := &Forwarder{DialFirst: d.DialFirst, Target: echo, Logger: slog.New(slog.DiscardHandler)}
	go func() { served <- f.Serve(ctx, ln) }()
	defer func() { cancel(); <-served }()

	stream := func(size int) (sent, got [32]byte, n int64) {
		t.Helper()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
		hs, hr := sha256.New(), sha256.New()
		done := make(chan error, 1)
		go func() {
			var err error
			n, err = io.Copy(hr, c)
			done <- err
		}()
		if _, err := io.CopyN(io.MultiWriter(c, hs), rand.Reader, int64(size)); err != nil {
			t.Fatalf("sending: %v", err)
		}
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("reading the echo after %d bytes: %v", n, err)
		}
		copy(sent[:], hs.Sum(nil))
		copy(got[:], hr.Sum(nil))
		return sent, got, n
	}
	stream(1) // the first tunnel to echo waits for the answer and makes it known as plain
	if !d.tlsEarly.plainDest(echo) {
		t.Fatal("an ok without e2e did not make the destination known as plain")
	}
	const size = 64 << 20
	sent, got, n := stream(size)
	if n != size || sent != got {
		t.Fatalf("the echo through an early TLS tunnel: %d bytes, SHA-256 %x; sent %d, %x", n, got[:8], size, sent[:8])
	}
}
