package tpd

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// BenchmarkUDPPaths: UDP to an echo on loopback, in one run, directly, through
// a tp UDP dial (tp/1 over QUIC, QUIC datagrams), and through CONNECT-UDP on
// the proxy name (h3 with HTTP/3 datagrams; h2 with capsules). "rtt" is one
// 64-byte datagram there and back at a time; "window" keeps 32 datagrams of
// 1200 bytes in flight and reports the echoed payload rate (a datagram not
// echoed within a second is counted lost and replaced). Client, tpd and echo
// share the process and the machine: compare the paths as ratios.
//
//	go test -run XXX -bench UDPPaths -benchtime 3s ./internal/server/tpd/
func BenchmarkUDPPaths(b *testing.B) {
	for _, p := range udpPaths(b) {
		b.Run("rtt/"+p.name, func(b *testing.B) {
			c := p.open(b)
			defer c.Close()
			msg := make([]byte, 64)
			for b.Loop() {
				if err := c.send(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := c.recv(10 * time.Second); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("window/"+p.name, func(b *testing.B) {
			c := p.open(b)
			defer c.Close()
			b.SetBytes(1200)
			b.ResetTimer()
			lost := windowEcho(b, c, b.N)
			b.ReportMetric(float64(lost)/float64(b.N), "lost/op")
		})
	}
}

// BenchmarkUDPPathsInterleaved is BenchmarkUDPPaths for a shared machine:
// every round runs each path in turn (200 round trips of 64 bytes, then 2,000
// datagrams of 1,200 bytes with 32 in flight), so that load from elsewhere
// falls on all paths alike, and it reports each path's mean round trip and
// echo rate and their ratios to direct UDP and to the tp UDP dial.
//
//	go test -run XXX -bench UDPPathsInterleaved -benchtime 5x ./internal/server/tpd/
func BenchmarkUDPPathsInterleaved(b *testing.B) {
	paths := udpPaths(b)
	conns := make([]udpPath, len(paths))
	for i, p := range paths {
		conns[i] = p.open(b)
		defer conns[i].Close()
	}
	const rtts, window = 200, 2000
	rttTime := make([]time.Duration, len(paths))
	winTime := make([]time.Duration, len(paths))
	lost := make([]int, len(paths))
	msg := make([]byte, 64)
	for b.Loop() {
		for i, c := range conns {
			start := time.Now()
			for range rtts {
				if err := c.send(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := c.recv(10 * time.Second); err != nil {
					b.Fatal(err)
				}
			}
			rttTime[i] += time.Since(start)
			start = time.Now()
			lost[i] += windowEcho(b, c, window)
			winTime[i] += time.Since(start)
		}
	}
	n := float64(b.N)
	for i, p := range paths {
		rtt := float64(rttTime[i].Microseconds()) / n / rtts
		rate := 1200 * window * n / winTime[i].Seconds() / 1e6
		b.ReportMetric(rtt, "µs-rtt-"+p.name)
		b.ReportMetric(rate, "MB/s-"+p.name)
		b.ReportMetric(float64(lost[i]), "lost-"+p.name)
		if i > 0 {
			b.ReportMetric(float64(rttTime[i])/float64(rttTime[0]), "rtt-x-direct-"+p.name)
			b.ReportMetric(float64(winTime[0])/float64(winTime[i]), "rate-x-direct-"+p.name)
		}
		if i > 1 {
			b.ReportMetric(float64(rttTime[i])/float64(rttTime[1]), "rtt-x-tpudp-"+p.name)
			b.ReportMetric(float64(winTime[1])/float64(winTime[i]), "rate-x-tpudp-"+p.name)
		}
	}
}

// windowEcho sends n datagrams of 1,200 bytes with 32 in flight and waits for
// their echoes; a datagram not echoed within a second is counted lost.
func windowEcho(b *testing.B, c udpPath, n int) (lost int) {
	msg := make([]byte, 1200)
	const window = 32
	inFlight, echoed := 0, 0
	for sent := 0; echoed+lost < n; {
		for inFlight < window && sent < n {
			if err := c.send(msg); err != nil {
				b.Fatal(err)
			}
			sent++
			inFlight++
		}
		if _, err := c.recv(time.Second); err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded) {
				b.Fatal(err)
			}
			lost += inFlight
			inFlight = 0
			continue
		}
		echoed++
		inFlight--
	}
	return lost
}

type namedPath struct {
	name string
	open func(b *testing.B) udpPath
}

// udpPaths are the ways to the same UDP echo: direct first, the tp UDP dial
// second.
func udpPaths(b *testing.B) []namedPath {
	r := newConnectRig(b, connectPolicy)
	echo := testnet.EchoUDP(b)
	return []namedPath{
		{"direct", func(b *testing.B) udpPath {
			c, err := net.Dial("udp", echo)
			if err != nil {
				b.Fatal(err)
			}
			return connPath{c}
		}},
		{"tp-udp-quic", func(b *testing.B) udpPath {
			dl, err := r.alice.Dialer()
			if err != nil {
				b.Fatal(err)
			}
			dl.Transport = clients.TransportQUIC
			c, err := dl.DialContext(context.Background(), "udp", echo)
			if err != nil {
				b.Fatal(err)
			}
			return connPath{c}
		}},
		{"connect-udp-h3", func(b *testing.B) udpPath {
			c, err := r.connectUDP(b, "h3", echo)
			if err != nil {
				b.Fatal(err)
			}
			if !c.Datagrams {
				b.Fatal("no HTTP/3 datagrams")
			}
			return masquePath{c}
		}},
		{"connect-udp-h2", func(b *testing.B) udpPath {
			c, err := r.connectUDP(b, "h2", echo)
			if err != nil {
				b.Fatal(err)
			}
			return masquePath{c}
		}},
	}
}

type udpPath interface {
	send([]byte) error
	recv(wait time.Duration) ([]byte, error)
	Close() error
}

type connPath struct{ net.Conn }

func (c connPath) send(p []byte) error {
	_, err := c.Write(p)
	return err
}

func (c connPath) recv(wait time.Duration) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	return buf[:n], err
}

type masquePath struct{ *clients.ConnectUDPConn }

func (c masquePath) send(p []byte) error { return c.WriteDatagram(p) }

func (c masquePath) recv(wait time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	return c.ReadDatagram(ctx)
}
