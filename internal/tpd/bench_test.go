package tpd

import (
	"context"
	"net"
	"runtime"
	"testing"

	"github.com/tp-proxy/tp/clients"
)

// Benchmarks on the real assembly (policy engine, user store, deny list, logging
// off), for profiling what tpd does beyond the proxy package's test setup:
//
//	go test -run XXX -bench Handshake -cpuprofile cpu.out ./internal/tpd/
//	go test -run XXX -bench IdleTunnel -benchtime 500x ./internal/tpd/
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

// BenchmarkIdleTunnel opens b.N TLS tunnels and leaves them idle, then reports
// what each holds: goroutines and stack bytes (tpd's alone: the client and the
// destination run none per tunnel), read before any garbage collection as a
// process that just accepted them holds them, and heap bytes after collection
// (tpd's and the client's TLS state together).
func BenchmarkIdleTunnel(b *testing.B) {
	dl, dest := benchDialer(b)
	collect := func() runtime.MemStats {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m
	}
	before, g0 := collect(), runtime.NumGoroutine()
	conns := make([]net.Conn, 0, b.N)
	b.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
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
}
