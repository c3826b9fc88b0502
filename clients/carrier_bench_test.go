package clients_test

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// benchDialers are the ways to reach one server, compared in one run: QUIC
// over each carrier, and tp/1's plain TLS transport (a TLS connection per
// request) as the baseline.
func benchDialers(b *testing.B, srv *clients.CarrierTestServer) map[string]*clients.Dialer {
	ds := map[string]*clients.Dialer{}
	for _, c := range []string{wire.CarrierUDP, wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP} {
		ds["quic-over-"+c] = srv.Dialer(b, c)
	}
	auto := srv.Dialer(b, clients.CarrierAuto) // UDP under a movable conn (no GSO, no batched reads)
	ds["quic-over-udp-auto"] = auto
	tlsT := srv.Dialer(b, "")
	tlsT.Transport = clients.TransportTLS
	ds["tls-transport"] = tlsT
	return ds
}

// BenchmarkCarrierThroughput: 8 MiB uploaded per op through the proxy to a
// loopback sink, per carrier (report ratios: the machine is shared).
func BenchmarkCarrierThroughput(b *testing.B) {
	srv := clients.StartCarrierTestServer(b, nil, proxy.CarrierOptions{})
	sink := testnet.Serve(b, func(c *net.TCPConn) { _, _ = io.Copy(io.Discard, c) })
	buf := make([]byte, 1<<20)
	for _, name := range []string{"quic-over-udp", "quic-over-udp-auto", "quic-over-tls", "quic-over-ws", "quic-over-http", "tls-transport"} {
		d := benchDialers(b, srv)[name]
		b.Run(name, func(b *testing.B) {
			b.SetBytes(8 << 20)
			for b.Loop() {
				c, err := d.DialContext(context.Background(), "tcp", sink)
				if err != nil {
					b.Fatal(err)
				}
				for range 8 {
					if _, err := c.Write(buf); err != nil {
						b.Fatal(err)
					}
				}
				_ = c.(interface{ CloseWrite() error }).CloseWrite()
				if _, err := io.Copy(io.Discard, c); err != nil {
					b.Fatal(err)
				}
				_ = c.Close()
			}
		})
	}
}

// BenchmarkCarrierRequest: one small request per op (a new stream or TLS
// connection, a hello, 64 bytes echoed), per carrier.
func BenchmarkCarrierRequest(b *testing.B) {
	srv := clients.StartCarrierTestServer(b, nil, proxy.CarrierOptions{})
	echo := testnet.Echo(b)
	msg := make([]byte, 64)
	for _, name := range []string{"quic-over-udp", "quic-over-udp-auto", "quic-over-tls", "quic-over-ws", "quic-over-http", "tls-transport"} {
		d := benchDialers(b, srv)[name]
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				c, err := d.DialContext(context.Background(), "tcp", echo)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, msg); err != nil {
					b.Fatal(err)
				}
				_ = c.Close()
			}
		})
	}
}

// BenchmarkCarrierMove: the time from UDP being blocked under a busy stream
// (64-byte round trips) to the first round trip completing over the next
// carrier, with CarrierStall 1s (the detection) included; ns/op is that time.
func BenchmarkCarrierMove(b *testing.B) {
	srv := clients.StartCarrierTestServer(b, nil, proxy.CarrierOptions{})
	echo := testnet.Echo(b)
	for _, next := range []string{wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP} {
		b.Run("udp-to-"+next, func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				gate := startUDPGate(b, srv.UDP)
				d := srv.Dialer(b, wire.CarrierUDP)
				d.QUICServer = gate.pc.LocalAddr().String()
				d.FallbackCarriers = []string{next}
				d.CarrierStall = time.Second
				c, err := d.DialContext(context.Background(), "tcp", echo)
				if err != nil {
					b.Fatal(err)
				}
				msg := make([]byte, 64)
				rt := func() {
					if _, err := c.Write(msg); err != nil {
						b.Fatal(err)
					}
					if _, err := io.ReadFull(c, msg); err != nil {
						b.Fatal(err)
					}
				}
				rt()
				b.StartTimer()
				gate.shut.Store(true)
				rt()
				b.StopTimer()
				_ = c.Close()
				_ = d.Close()
				b.StartTimer()
			}
		})
	}
}

// BenchmarkCarrierDownload: 8 MiB downloaded per op from a loopback source
// through the proxy, per carrier.
func BenchmarkCarrierDownload(b *testing.B) {
	srv := clients.StartCarrierTestServer(b, nil, proxy.CarrierOptions{})
	src := testnet.Serve(b, func(c *net.TCPConn) {
		buf := make([]byte, 1<<20)
		for range 8 {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	for _, name := range []string{"quic-over-udp", "quic-over-udp-auto", "quic-over-tls", "quic-over-ws", "quic-over-http", "tls-transport"} {
		d := benchDialers(b, srv)[name]
		b.Run(name, func(b *testing.B) {
			b.SetBytes(8 << 20)
			for b.Loop() {
				c, err := d.DialContext(context.Background(), "tcp", src)
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.Copy(io.Discard, c)
				if err != nil || n != 8<<20 {
					b.Fatalf("read %d bytes: %v", n, err)
				}
				_ = c.Close()
			}
		})
	}
}
