package proxy_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// UDP through TP against direct UDP, and QUIC stream throughput through TP against
// raw quic-go, in one run:
//
//	go test -run XXX -bench 'UDP|QUIC' -benchtime 2s -count 3 ./proxy/

func benchUDPConn(b *testing.B, transport, dest string) net.Conn {
	b.Helper()
	if transport == "direct" {
		c, err := net.Dial("udp", dest)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = c.Close() })
		return c
	}
	q := newQUICEnv(b, nil, proxy.QUICOptions{})
	return dialVia(b, q.udpDialer(b, transport), "udp", dest)
}

// BenchmarkUDPEcho: round trip of one 64-byte datagram through a UDP echo (ns/op
// is the round-trip time).
func BenchmarkUDPEcho(b *testing.B) {
	for _, tr := range []string{"direct", clients.TransportTLS, clients.TransportQUIC} {
		b.Run(tr, func(b *testing.B) {
			c := benchUDPConn(b, tr, testnet.EchoUDP(b))
			msg := make([]byte, 64)
			buf := make([]byte, 2048)
			lost := 0
			for b.Loop() {
				for {
					if _, err := c.Write(msg); err != nil {
						b.Fatal(err)
					}
					_ = c.SetReadDeadline(time.Now().Add(time.Second))
					if _, err := c.Read(buf); err == nil {
						break
					} else if !isTimeout(err) {
						b.Fatal(err)
					}
					lost++
				}
			}
			b.ReportMetric(float64(lost), "lost")
		})
	}
}

// BenchmarkUDPThroughput: 1200-byte datagrams through a UDP echo with up to 64
// in flight (a window refilled by replies, and after 20 ms of silence, so loss does
// not stall it); MB/s counts datagrams that came back, one way.
func BenchmarkUDPThroughput(b *testing.B) {
	const size, window = 1200, 64
	for _, tr := range []string{"direct", clients.TransportTLS, clients.TransportQUIC} {
		b.Run(tr, func(b *testing.B) {
			c := benchUDPConn(b, tr, testnet.EchoUDP(b))
			b.SetBytes(size)
			tokens := make(chan struct{}, window)
			for range window {
				tokens <- struct{}{}
			}
			var sent atomic.Int64
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				msg := make([]byte, size)
				for {
					select {
					case <-tokens:
					case <-stop:
						return
					}
					if _, err := c.Write(msg); err != nil {
						return
					}
					sent.Add(1)
				}
			}()
			buf := make([]byte, 2048)
			got := 0
			b.ResetTimer()
			for got < b.N {
				_ = c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
				if _, err := c.Read(buf); err != nil {
					if !isTimeout(err) {
						b.Fatal(err)
					}
					for len(tokens) < window { // assume the window was lost: refill it
						tokens <- struct{}{}
					}
					continue
				}
				got++
				select {
				case tokens <- struct{}{}:
				default:
				}
			}
			b.StopTimer()
			close(stop)
			_ = c.SetReadDeadline(time.Now())
			wg.Wait()
			if s := sent.Load(); s > 0 { // up to a window may still be in flight
				b.ReportMetric(100*float64(max(0, s-int64(got)-window))/float64(s), "%lost")
			}
		})
	}
}

// rawQUICSink is a quic-go listener without TP, with TP's receive windows: each
// stream is read to its end and its byte count reported.
func rawQUICSink(b *testing.B, q *quicEnv) (string, <-chan int64) {
	b.Helper()
	cert := q.ca.ServerCert(b, "localhost", "127.0.0.1")
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"raw"}}, &quic.Config{
		InitialStreamReceiveWindow:     wire.QUICInitialStreamWindow,
		MaxStreamReceiveWindow:         wire.QUICMaxStreamWindow,
		InitialConnectionReceiveWindow: wire.QUICInitialConnWindow,
		MaxConnectionReceiveWindow:     wire.QUICMaxConnWindow,
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = ln.Close() })
	counts := make(chan int64, 16)
	go func() {
		for {
			conn, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				for {
					str, err := conn.AcceptStream(context.Background())
					if err != nil {
						return
					}
					go func() {
						n, _ := io.Copy(io.Discard, str)
						str.Close()
						counts <- n
					}()
				}
			}()
		}
	}()
	return ln.Addr().String(), counts
}

// benchStreams writes b.N 1 MiB chunks spread over the streams and waits until the
// sink has all of them.
func benchStreams(b *testing.B, streams []io.WriteCloser, counts <-chan int64) {
	var left atomic.Int64
	left.Store(int64(b.N))
	b.SetBytes(benchChunk)
	b.ResetTimer()
	var wg sync.WaitGroup
	for _, s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, benchChunk)
			for left.Add(-1) >= 0 {
				if _, err := s.Write(buf); err != nil {
					b.Error(err)
					return
				}
			}
			_ = s.Close()
		}()
	}
	wg.Wait()
	for range streams {
		<-counts
	}
}

// BenchmarkQUICStreams: bulk throughput of raw quic-go (no TP) and of TP over
// QUIC, on 1 and on 8 parallel streams of one connection.
func BenchmarkQUICStreams(b *testing.B) {
	for _, n := range []int{1, 8} {
		b.Run("raw/"+itoa(n), func(b *testing.B) {
			q := newQUICEnv(b, nil, proxy.QUICOptions{})
			addr, counts := rawQUICSink(b, q)
			conn, err := quic.DialAddr(context.Background(), addr, &tls.Config{RootCAs: q.ca.Pool, ServerName: "localhost", NextProtos: []string{"raw"}}, &quic.Config{})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = conn.CloseWithError(0, "") })
			var streams []io.WriteCloser
			for range n {
				s, err := conn.OpenStream()
				if err != nil {
					b.Fatal(err)
				}
				streams = append(streams, s)
			}
			benchStreams(b, streams, counts)
		})
		b.Run("tp/"+itoa(n), func(b *testing.B) {
			q := newQUICEnv(b, nil, proxy.QUICOptions{})
			addr, counts := startSink(b)
			d := q.quicDialer(b)
			var streams []io.WriteCloser
			for range n {
				c, err := d.DialContext(context.Background(), "tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				streams = append(streams, halfCloser{c})
			}
			benchStreams(b, streams, counts)
		})
	}
}

// halfCloser makes Close a half-close, so the sink sees the end of the data.
type halfCloser struct{ net.Conn }

func (h halfCloser) Close() error {
	if cw, ok := h.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("cannot half-close")
}

func itoa(n int) string { return string(rune('0' + n)) }
