package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// TestBridgeHalfClose: client ⇄ [a Bridge b] ⇄ server over real TCP. The client
// half-closes, the server still answers after that, and the counts are exact.
func TestBridgeHalfClose(t *testing.T) {
	t.Parallel()
	client, a := testnet.Pair(t)
	b, server := testnet.Pair(t)
	type result struct {
		ab, ba int64
		err    error
	}
	done := make(chan result, 1)
	go func() {
		ab, ba, err := wire.Bridge(context.Background(), a, b)
		done <- result{ab, ba, err}
	}()
	_ = client.SetDeadline(time.Now().Add(10 * time.Second))
	_ = server.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.WriteString(client, "question")
	_ = client.CloseWrite()
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "question" {
		t.Fatalf("server read %q, %v", got, err)
	}
	_, _ = io.WriteString(server, "late answer")
	_ = server.CloseWrite()
	got, err = io.ReadAll(client)
	if err != nil || string(got) != "late answer" {
		t.Fatalf("client read %q, %v", got, err)
	}
	r := <-done
	if r.err != nil || r.ab != 8 || r.ba != 11 {
		t.Fatalf("Bridge = %d, %d, %v; want 8, 11, nil", r.ab, r.ba, r.err)
	}
}

// TestBridgeContext: ending ctx ends a bridge whose peers are idle, with the cause.
func TestBridgeContext(t *testing.T) {
	t.Parallel()
	_, a := testnet.Pair(t)
	b, _ := testnet.Pair(t)
	cause := errors.New("certificate expired")
	ctx, cancel := context.WithCancelCause(context.Background())
	done := make(chan error, 1)
	go func() {
		_, _, err := wire.Bridge(ctx, a, b)
		done <- err
	}()
	cancel(cause)
	select {
	case err := <-done:
		if !errors.Is(err, cause) {
			t.Fatalf("Bridge = %v; want the context cause", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Bridge did not end with its context")
	}
}

// endedCtx has ended (Err) but never closes Done, so Bridge's AfterFunc never
// runs: the state a bridge is in between a cut's cancel and that goroutine.
type endedCtx struct {
	context.Context
	err error
}

func (c endedCtx) Err() error { return c.err }

// TestBridgeCutBeatsSideFailure: a session's context has ended (a peer
// instance's shutdown notice cut it) and one side is reset before the
// context's own goroutine runs — the bad input is the reset racing the cut.
// The session must end for the cut's reason, not as that side's failure, or
// the client is told peer_reset instead of shutdown.
func TestBridgeCutBeatsSideFailure(t *testing.T) {
	t.Parallel()
	client, a := testnet.Pair(t)
	b, _ := testnet.Pair(t)
	ctx := endedCtx{Context: context.Background(), err: wire.ErrShutdown}
	done := make(chan error, 1)
	go func() {
		_, _, err := wire.Bridge(ctx, a, b)
		done <- err
	}()
	_ = client.SetLinger(0)
	_ = client.Close() // a reset reaches a's reader
	select {
	case err := <-done:
		var cut *wire.CutError
		if !errors.Is(err, wire.ErrShutdown) || errors.As(err, &cut) {
			t.Fatalf("Bridge = %v; want the context's cause (shutdown), not a side's failure", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Bridge did not end when a side was reset")
	}
}

// TestBridgeNoHalfClose: net.Pipe cannot half-close, so EOF from one side closes the
// other entirely instead of leaving it waiting forever.
func TestBridgeNoHalfClose(t *testing.T) {
	t.Parallel()
	client, a := net.Pipe()
	b, server := net.Pipe()
	done := make(chan error, 1)
	go func() {
		_, _, err := wire.Bridge(context.Background(), a, b)
		done <- err
	}()
	go func() {
		_, _ = io.WriteString(client, "x")
		client.Close()
	}()
	_ = server.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(server)
	if string(got) != "x" || err != nil {
		t.Fatalf("server read %q, %v", got, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Bridge = %v", err)
	}
}

// TestBridgeGoroutines: an idle bridge holds two goroutines, the caller's (one
// direction) and one more (the other), since every goroutine of an idle tunnel
// keeps a stack.
func TestBridgeGoroutines(t *testing.T) { // not parallel: it counts the process's goroutines
	client, a := testnet.Pair(t)
	b, _ := testnet.Pair(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _, _ = wire.Bridge(context.Background(), a, b)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for goroutinesWith("wire.copyConn") < 2 { // both directions are running
		if time.Now().After(deadline) {
			t.Fatal("the bridge's two directions never started")
		}
		runtime.Gosched()
	}
	if n := goroutinesWith("wire.(*bridgeState).pipe"); n != 2 {
		t.Errorf("an idle bridge holds %d goroutines, want 2", n)
	}
	client.Close()
	b.Close()
	<-done
}

// goroutinesWith returns how many goroutines have a frame of fn on their stack.
func goroutinesWith(fn string) int {
	buf := make([]byte, 4<<20)
	n := 0
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// TestIdleSessionGoroutines: an idle proxy session holds two goroutines (its
// connection's, in relay, and Bridge's other direction), and the goroutine of
// the request's set-up has ended. What this saves is stack size, which no test
// can see; BenchmarkIdleTunnel in internal/server/tpd reports it.
func TestIdleSessionGoroutines(t *testing.T) { // not parallel: it counts the process's goroutines
	e := newEnv(t, nil)
	d := e.dialer()
	c, err := d.DialContext(context.Background(), "tcp", e.echo)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for goroutinesWith("proxy.(*Server).open") > 0 || goroutinesWith("wire.copyConn") < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the session's set-up never ended or its relay never started")
		}
		runtime.Gosched()
	}
	if n := goroutinesWith("proxy.(*Server).relay"); n != 1 {
		t.Errorf("%d goroutines in relay, want 1", n)
	}
	if n := goroutinesWith("wire.(*bridgeState).pipe"); n != 2 {
		t.Errorf("the session holds %d goroutines, want 2", n)
	}
	for _, fn := range []string{"HandshakeContext", "proxy.(*Server).establish"} {
		if n := goroutinesWith(fn); n != 0 {
			t.Errorf("%d goroutines still hold %s frames", n, fn)
		}
	}
}

// TestIdleTunnelHoldsNoCopyBuffer: a local client ⇄ Forwarder ⇄ TLS tunnel ⇄
// proxy ⇄ echo destination. Messages of every size around the copy loops' edges
// (a one-byte TLS record, a record of exactly the small-read size, several
// records) come back whole and without waiting for more data, then a bulk
// transfer moves; once the tunnel is idle again, neither end's Bridge holds a
// pooled copy buffer. The bad state: a direction blocked in Read with its 64 KiB
// buffer, on the TCP side (tp forward's local connection, the destination's) or
// the TLS side (the tunnel, on both ends).
func TestIdleTunnelHoldsNoCopyBuffer(t *testing.T) { // not parallel: it counts the process's copy buffers
	e := newEnv(t, nil)
	d := e.dialer()
	d.Transport = clients.TransportTLS
	defer d.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- (&clients.Forwarder{Dial: d.DialContext, Target: e.echo, Logger: discardLogger()}).Serve(ctx, ln)
	}()
	defer func() {
		cancel()
		<-served
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A stall (a direction that waits for more after a short record) fails the
	// read with this bound instead of hanging the test.
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	for _, size := range []int{1, 1, 2, 100, 2047, 2048, 2049, 16384, 16385, 70000, 1} {
		msg := bytes.Repeat([]byte{byte(size)}, size)
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("writing a %d-byte message: %v", size, err)
		}
		got := make([]byte, size)
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("reading back a %d-byte message: %v", size, err)
		}
		if !bytes.Equal(got, msg) {
			t.Fatalf("a %d-byte message came back changed", size)
		}
	}
	const bulk = 8 << 20
	wrote := make(chan error, 1)
	go func() {
		_, err := c.Write(bytes.Repeat([]byte("tp"), bulk/2))
		wrote <- err
	}()
	if n, err := io.CopyN(io.Discard, c, bulk); err != nil {
		t.Fatalf("bulk echo: %d of %d bytes came back: %v", n, bulk, err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for wire.CopyBuffersHeld() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the idle tunnel's Bridges still hold %d pooled copy buffers, want 0", wire.CopyBuffersHeld())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
