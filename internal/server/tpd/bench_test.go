package tpd

import (
	"context"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
)

// Benchmarks on the real assembly (policy engine, user store, deny list, logging
// off), for profiling what tpd does beyond the proxy package's test setup:
//
//	go test -run XXX -bench Handshake -cpuprofile cpu.out ./internal/server/tpd/
//	go test -run XXX -bench IdleTunnel -benchtime 500x ./internal/server/tpd/
//
// Client and server share the process, so profiles show both sides.

// holdServer accepts connections and keeps them open without a goroutine each:
// a destination that costs the benchmark nothing per idle tunnel.
func holdServer(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var held []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	b.Cleanup(func() {
		ln.Close()
		<-done
		for _, c := range held {
			c.Close()
		}
	})
	return ln.Addr().String()
}

func benchDialer(b *testing.B) (*clients.Dialer, string) {
	d, url := startDaemon(b, allowAlice)
	c, _, _ := enrollClient(b, d, url, "alice", "laptop")
	dl, err := c.Dialer()
	if err != nil {
		b.Fatal(err)
	}
	dl.Transport = clients.TransportTLS
	return dl, holdServer(b)
}

// BenchmarkHandshake: a new TLS connection per request (full handshake, hello,
// policy, dial), closed once the server said ok.
func BenchmarkHandshake(b *testing.B) {
	dl, dest := benchDialer(b)
	for b.Loop() {
		conn, err := dl.DialContext(context.Background(), "tcp", dest)
		if err != nil {
			b.Fatal(err)
		}
		conn.Close()
	}
}

// BenchmarkIdleTunnel opens b.N tunnels over each carrier and leaves them idle,
// then reports what each holds: goroutines and stack bytes, read before any
// garbage collection as a process that just accepted them holds them, and heap
// bytes after collection (tpd's and the client's state together). With
// TP_IDLE_HEAPPROFILE=FILE it writes a heap profile (FILE-tls, FILE-quic) while
// the tunnels are open, for `go tool pprof -sample_index=inuse_space`.
func BenchmarkIdleTunnel(b *testing.B) {
	for _, tr := range []string{clients.TransportTLS, clients.TransportQUIC} {
		b.Run(tr, func(b *testing.B) { benchIdle(b, tr) })
	}
}

func benchIdle(b *testing.B, transport string) {
	d, url := startDaemonCfg(b, allowAlice, func(c *config.Server) {
		c.QUICMaxStreams, c.MaxSessionsPerIdentity = 100_000, 1_000_000
	})
	c, _, _ := enrollClient(b, d, url, "alice", "laptop")
	dl, err := c.Dialer()
	if err != nil {
		b.Fatal(err)
	}
	dl.Transport = transport
	dest := holdServer(b)
	collect := func() runtime.MemStats {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m
	}
	// One tunnel first, so that what every carrier sets up once (the QUIC
	// connection) is not counted per tunnel.
	first, err := dl.DialContext(context.Background(), "tcp", dest)
	if err != nil {
		b.Fatal(err)
	}
	conns := []net.Conn{first}
	b.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	before, g0 := collect(), runtime.NumGoroutine()
	b.ResetTimer()
	for range b.N {
		conn, err := dl.DialContext(context.Background(), "tcp", dest)
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, conn)
	}
	b.StopTimer()
	var idle runtime.MemStats
	runtime.ReadMemStats(&idle)
	g1 := runtime.NumGoroutine()
	after := collect()
	n := float64(b.N)
	b.ReportMetric(float64(g1-g0)/n, "goroutines/tunnel")
	b.ReportMetric((float64(idle.StackInuse)-float64(before.StackInuse))/n, "stack-B/tunnel")
	b.ReportMetric((float64(after.HeapAlloc)-float64(before.HeapAlloc))/n, "heap-B/tunnel")
	if f := os.Getenv("TP_IDLE_HEAPPROFILE"); f != "" {
		out, err := os.Create(f + "-" + transport)
		if err != nil {
			b.Fatal(err)
		}
		defer out.Close()
		if err := pprof.Lookup("heap").WriteTo(out, 0); err != nil {
			b.Fatal(err)
		}
	}
}
