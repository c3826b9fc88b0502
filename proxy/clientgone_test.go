package proxy_test

import (
	"context"
	"errors"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
)

// Bad input: a client opens a tunnel to a service that accepts and never
// reads or writes, fills what the server will take of its upload, and goes
// away (its QUIC or tp-mux connection ends). The server's copy of the session
// is blocked writing to the destination and reading from it, touching the
// client's stream no more; before, such sessions outlived their clients, each
// holding a slot of max-sessions-per-identity and its buffers until the
// destination moved. Now the session ends when the client's connection does,
// and the destination sees an abort (a reset), not a clean end.
func TestSessionEndsWhenItsClientGoes(t *testing.T) {
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			q := newQUICEnv(t, nil, proxy.QUICOptions{})
			dest, accepted := testnet.Accept(t) // never reads, never writes
			d := q.dialer()
			d.Transport = transport
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c, err := d.DialContext(ctx, "tcp", dest)
			if err != nil {
				t.Fatal(err)
			}
			var stalled *net.TCPConn
			select {
			case stalled = <-accepted:
			case <-ctx.Done():
				t.Fatal("the destination accepted no connection")
			}
			// Upload until the windows on the way are full: a write then
			// stays blocked, and its deadline ends it.
			chunk := make([]byte, 256<<10)
			for {
				_ = c.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
				if _, err := c.Write(chunk); err != nil {
					if !errors.Is(err, context.DeadlineExceeded) && !isTimeout(err) {
						t.Fatalf("upload: %v; want it to stall against a destination that does not read", err)
					}
					break
				}
			}
			waitUntil(t, 10*time.Second, "the session to be live on the server", func() bool { return q.srv.Live() == 1 })

			d.Close() // the client goes: its connection to the server ends

			waitUntil(t, 20*time.Second, "the session to end after its client's connection did", func() bool { return q.srv.Live() == 0 })
			// The destination sees the session aborted: a reset, once its
			// receive buffer is read past what the server had written.
			_ = stalled.SetReadDeadline(time.Now().Add(20 * time.Second))
			buf := make([]byte, 1<<20)
			for {
				if _, err := stalled.Read(buf); err != nil {
					if !errors.Is(err, syscall.ECONNRESET) {
						t.Fatalf("the destination's connection ended with %v; want a reset (an abort, not a clean end)", err)
					}
					break
				}
			}
		})
	}
}

// waitUntil polls cond until it holds, failing with what did not happen once
// d has passed.
func waitUntil(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s; it did not happen", d, what)
		}
		time.Sleep(5 * time.Millisecond) // polling, bounded by the deadline
	}
}

// BenchmarkStalledSessionMemory reports what one session to a destination that
// never reads holds once the client's upload has stalled against it (heap in
// use after a collection, client and server in this process, divided by the
// sessions; the kernel's socket buffers are not counted). Each session has a
// client, so a connection, of its own, as separate tp processes would.
func BenchmarkStalledSessionMemory(b *testing.B) {
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		b.Run(transport, func(b *testing.B) {
			const sessions = 20
			q := newQUICEnv(b, nil, proxy.QUICOptions{})
			dest, accepted := testnet.Accept(b)
			go func() {
				for range accepted { // held open, never read, until the benchmark ends
				}
			}()
			var before, after runtime.MemStats
			for i := 0; i < b.N; i++ {
				runtime.GC()
				runtime.ReadMemStats(&before)
				var dialers []*clients.Dialer
				for n := range sessions {
					d := q.dialer()
					d.Transport = transport
					dialers = append(dialers, d)
					c, err := d.DialContext(context.Background(), "tcp", dest)
					if err != nil {
						b.Fatalf("session %d of %d: %v", n+1, sessions, err)
					}
					chunk := make([]byte, 256<<10)
					for {
						_ = c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
						if _, err := c.Write(chunk); err != nil {
							break
						}
					}
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				b.ReportMetric(float64(int64(after.HeapInuse)-int64(before.HeapInuse))/sessions, "heap-B/session")
				for _, d := range dialers {
					d.Close()
				}
			}
		})
	}
}
