package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
)

// serveUDPForwarder runs fwd on a loopback UDP socket and returns its address;
// when the test ends, fwd's Serve must return context.Canceled within 10s.
func serveUDPForwarder(t *testing.T, fwd *clients.UDPForwarder) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- fwd.Serve(ctx, pc) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-served:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Serve = %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("the UDP forwarder's Serve did not return within 10s of cancel")
		}
	})
	return pc.LocalAddr().String()
}

// startUDPRecordingEcho runs a loopback UDP echo that remembers from which
// address each payload first arrived: through TP, that address is the server's
// socket of one flow, so two payloads from one address travelled in one flow.
func startUDPRecordingEcho(t *testing.T) (addr string, from func(payload string) string) {
	t.Helper()
	var mu sync.Mutex
	seen := map[string]string{}
	addr = testnet.ServeUDP(t, func(p []byte, src net.Addr) []byte {
		mu.Lock()
		if _, ok := seen[string(p)]; !ok {
			seen[string(p)] = src.String()
		}
		mu.Unlock()
		return p
	})
	return addr, func(p string) string {
		mu.Lock()
		defer mu.Unlock()
		return seen[p]
	}
}

// TestUDPForwarderEvictsLeastRecentlyUsed: `tp forward --udp` serves at most 32
// local sources at once (the default); a 33rd ends the flow of the source heard
// from least recently, not that of one still talking. Bad input: 33 local
// sources, the first of which keeps talking while the second falls silent.
func TestUDPForwarderEvictsLeastRecentlyUsed(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	echo, from := startUDPRecordingEcho(t)
	fwd := &clients.UDPForwarder{ // MaxFlows left at its default
		Dial: q.udpDialer(t, clients.TransportQUIC).DialContext, Target: echo,
		Logger: slog.New(slog.DiscardHandler),
	}
	local := serveUDPForwarder(t, fwd)
	const limit = 32
	srcs := make([]net.Conn, limit+1)
	for i := range srcs {
		c, err := net.Dial("udp", local)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		srcs[i] = c
	}
	say := func(i int, what string) string {
		msg := fmt.Sprintf("%s from source %d", what, i)
		udpEcho(t, srcs[i], []byte(msg))
		return from(msg)
	}
	first := make([]string, limit)
	for i := range limit {
		first[i] = say(i, "first")
	}
	waitFor(t, func() bool { return q.srv.UDPStats().Active == limit })
	if again := say(0, "refresh"); again != first[0] {
		t.Fatalf("source 0 changed flow (%s, then %s) while below the limit", first[0], again)
	}
	// Source 1 is now the least recently used; the 33rd source takes its place.
	say(limit, "first")
	for deadline := time.Now().Add(10 * time.Second); q.srv.UDPStats().Active != limit; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d flows open with 33 local sources; want the limit, 32", q.srv.UDPStats().Active)
		}
	}
	if again := say(0, "again"); again != first[0] {
		t.Fatalf("source 0, the most recently used, lost its flow to the 33rd source (%s, then %s)", first[0], again)
	}
	for i := 2; i < limit; i++ {
		if again := say(i, "again"); again != first[i] {
			t.Fatalf("source %d lost its flow to the 33rd source (%s, then %s); source 1 was the least recently used", i, first[i], again)
		}
	}
	if again := say(1, "again"); again == first[1] {
		t.Fatalf("source 1, the least recently used, kept its flow (%s) beside 32 others", again)
	}
	if n := fwd.Dropped(); n != 0 {
		t.Fatalf("forwarder dropped %d datagrams", n)
	}
}

// TestUDPForwarderSlowDialIsNotIdle: a flow's idle time counts from when it is
// open. Bad input: a dial that takes 5 times the idle timeout (a slow link, or
// a loaded machine); the first datagram, queued meanwhile, still reaches the
// target once the flow is open: the flow was not ended as idle while it
// connected. (Its echo is not awaited: a round trip slower than the idle
// timeout on a loaded machine would end the flow as idle, rightly.)
func TestUDPForwarderSlowDialIsNotIdle(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	got := make(chan string, 1)
	target := testnet.ServeUDP(t, func(p []byte, _ net.Addr) []byte {
		select {
		case got <- string(p):
		default:
		}
		return nil
	})
	dl := q.udpDialer(t, clients.TransportQUIC)
	const idle = 200 * time.Millisecond
	local := serveUDPForwarder(t, &clients.UDPForwarder{
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			select {
			case <-time.After(5 * idle): // the slow dial: the workload, not a wait
			case <-ctx.Done():
				return nil, context.Cause(ctx)
			}
			return dl.DialContext(ctx, network, addr)
		},
		Target: target, IdleTimeout: idle, Logger: slog.New(slog.DiscardHandler),
	})
	c, err := net.Dial("udp", local)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-got:
		if p != "first" {
			t.Fatalf("the target received %q; want the first datagram", p)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the first datagram of a flow that took 5× the idle timeout to dial never reached the target: the flow was ended as idle while it connected")
	}
}
