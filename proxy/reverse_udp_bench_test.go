package proxy_test

import (
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
)

// BenchmarkReverseUDPEcho: round trip of one 64-byte datagram to a UDP echo
// behind an agent (tp expose --udp), next to the forward path (tp forward --udp)
// in the same run; ns/op is the round-trip time:
//
//	go test -run XXX -bench 'UDPEcho' -benchtime 2s ./proxy/
//
// public: a plain UDP client on the relay's public UDP port; protected: a TP
// dialer to the name, datagrams inside the end-to-end TLS session.
func BenchmarkReverseUDPEcho(b *testing.B) {
	for _, tc := range []struct{ mode, transport string }{
		{"forward", clients.TransportTLS}, {"forward", clients.TransportQUIC},
		{"public", clients.TransportTLS}, {"public", clients.TransportQUIC},
		{"protected", clients.TransportTLS}, {"protected", clients.TransportQUIC},
	} {
		b.Run(tc.mode+"/"+tc.transport, func(b *testing.B) {
			echo := testnet.EchoUDP(b)
			var c net.Conn
			if tc.mode == "forward" {
				q := newQUICEnv(b, nil, proxy.QUICOptions{})
				c = dialVia(b, q.udpDialer(b, tc.transport), "udp", echo)
			} else {
				c = reverseUDPConn(b, tc.mode, tc.transport, echo)
			}
			msg, buf := make([]byte, 64), make([]byte, 2048)
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

// reverseUDPConn runs a relay and an agent that exposes target (UDP) as the
// protected name "dns" and the public name "game" (a public UDP port), and
// returns a connection to it in mode "public" or "protected".
func reverseUDPConn(b *testing.B, mode, transport, target string) net.Conn {
	b.Helper()
	port := testnet.FreePort(b, "udp")
	q := startReverseAgent(b, transport, "dns", []clients.Exposed{
		{Name: "dns", Local: target, UDP: true}, {Name: "game", Local: target, UDP: true, PublicPort: port}})
	if mode == "public" {
		c, err := net.Dial("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		return c
	}
	d := q.dialer()
	d.Transport = transport
	b.Cleanup(func() { d.Close() })
	return dialVia(b, d, "udp", "dns.rev.test:53")
}
