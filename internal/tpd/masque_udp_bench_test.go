package tpd

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testnet"
)

// BenchmarkUDPPaths: UDP to an echo on loopback, in one run, directly, through
// a tp UDP dial (tp/1 over QUIC, QUIC datagrams), and through CONNECT-UDP on
// the proxy name (h3 with HTTP/3 datagrams; h2 with capsules). "rtt" is one
// 64-byte datagram there and back at a time; "window" keeps 32 datagrams of
// 1200 bytes in flight and reports the echoed payload rate (a datagram not
// echoed within a second is counted lost and replaced). Client, tpd and echo
// share the process and the machine: compare the paths as ratios.
//
//	go test -run XXX -bench UDPPaths -benchtime 3s ./internal/tpd/
func BenchmarkUDPPaths(b *testing.B) {
	r := newConnectRig(b, connectPolicy)
	echo := testnet.EchoUDP(b)
	paths := []struct {
		name string
		open func(b *testing.B) udpPath
	}{
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
	for _, p := range paths {
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
			msg := make([]byte, 1200)
			const window = 32
			inFlight, echoed, lost := 0, 0, 0
			b.SetBytes(1200)
			b.ResetTimer()
			for sent := 0; echoed+lost < b.N; {
				for inFlight < window && sent < b.N {
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
			b.ReportMetric(float64(lost)/float64(b.N), "lost/op")
		})
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
