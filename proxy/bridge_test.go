package proxy_test

import (
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// TestBridgeHalfClose: client ⇄ [a Bridge b] ⇄ server over real TCP. The client
// half-closes, the server still answers after that, and the counts are exact.
func TestBridgeHalfClose(t *testing.T) {
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

// TestBridgeNoHalfClose: net.Pipe cannot half-close, so EOF from one side closes the
// other entirely instead of leaving it waiting forever.
func TestBridgeNoHalfClose(t *testing.T) {
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
func TestBridgeGoroutines(t *testing.T) {
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
// can see; BenchmarkIdleTunnel in internal/tpd reports it.
func TestIdleSessionGoroutines(t *testing.T) {
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
