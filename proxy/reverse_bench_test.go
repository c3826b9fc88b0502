package proxy_test

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
)

// Reverse path, next to the forward path's BenchmarkThroughput*/BenchmarkNewConn*
// in the same run: go test -run XXX -bench 'Throughput|NewConn|NewStream|Reverse' ./proxy/
//
// Protected: dialer → relay → agent → inner TLS 1.3 between dialer and agent →
// local service. Public: plain TCP client → public port of the relay → agent →
// local service. The agent's carrier is QUIC (a stream per session) or TLS (an
// announcement plus a new TLS connection per session); the protected dialer uses
// the same transport as the agent.

// reverseBench is a relay with a protected name "svc" and a public name "pub"
// (public port) served by one agent, both to target.
type reverseBench struct {
	q      *quicEnv
	dialer *clients.Dialer
	public string // 127.0.0.1:port
}

func newReverseBench(b *testing.B, mode, transport, target string) *reverseBench {
	b.Helper()
	port := testnet.FreePort(b, "tcp")
	q := startReverseAgent(b, transport, "svc", []clients.Exposed{{Name: "svc", Local: target}, {Name: "pub", Local: target, PublicPort: port}})
	d := q.dialer()
	d.Transport = transport
	// As tp's own dialer does (clients.Client.Dialer): resume TLS sessions to the
	// relay and, end to end, to the agent.
	d.TLSConfig.ClientSessionCache = tls.NewLRUClientSessionCache(64)
	d.NoE2EMux = mode != "protected"
	d.NoE2EAttach = mode == "protected-handshake"
	b.Cleanup(func() { d.Close() })
	return &reverseBench{q: q, dialer: d, public: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
}

func (r *reverseBench) dial(b *testing.B, mode string) net.Conn {
	var c net.Conn
	var err error
	if mode == "public" {
		c, err = net.Dial("tcp", r.public)
	} else {
		c, err = r.dialer.DialContext(context.Background(), "tcp", "svc.rev.test:22")
	}
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// protected: sessions are streams of the one end-to-end carrier the dialer
// keeps to the name (tp-e2e-mux/1, the default); protected-attach: each
// session is a dial of its own through the relay that attaches to the
// end-to-end state of the first (tp-e2e/2); protected-handshake: each runs a
// TLS handshake with the agent (tp-e2e/1, resumed), as before attach existed.
var reverseCases = []struct{ mode, transport string }{
	{"protected", clients.TransportTLS}, {"protected", clients.TransportQUIC},
	{"protected-attach", clients.TransportTLS}, {"protected-attach", clients.TransportQUIC},
	{"protected-handshake", clients.TransportTLS}, {"protected-handshake", clients.TransportQUIC},
	{"public", clients.TransportTLS}, {"public", clients.TransportQUIC},
}

// checkProtectedPath fails b when the measured protected sessions did not
// take the path their mode names: n streams of a carrier, or n attaches.
func checkProtectedPath(b *testing.B, r *reverseBench, mode string, n int) {
	b.Helper()
	switch mode {
	case "protected":
		if _, streams := r.dialer.E2EMuxStats(); streams < n {
			b.Fatalf("%d sessions went as streams of the end-to-end carrier; want every measured one (%d)", streams, n)
		}
	case "protected-attach":
		if full, attached := r.dialer.E2EStats(); attached < n {
			b.Fatalf("%d sessions attached and %d ran a handshake; want every measured one (%d) attached", attached, full, n)
		}
	}
}

// BenchmarkReverseThroughput: bulk bytes (1 MiB writes) to a sink behind an agent.
func BenchmarkReverseThroughput(b *testing.B) {
	for _, tc := range reverseCases {
		b.Run(tc.mode+"/"+tc.transport, func(b *testing.B) {
			addr, counts := startSink(b)
			r := newReverseBench(b, tc.mode, tc.transport, addr)
			if tc.mode == "protected" || tc.mode == "protected-attach" { // the measured session attaches to this one's state, or is a stream of its carrier
				c := r.dial(b, tc.mode)
				_ = c.(interface{ CloseWrite() error }).CloseWrite()
				_, _ = io.Copy(io.Discard, c)
				c.Close()
				<-counts
			}
			benchThroughput(b, r.dial(b, tc.mode), counts)
			checkProtectedPath(b, r, tc.mode, 1)
		})
	}
}

// BenchmarkReverseNewSession: a new session to an echo service behind an agent,
// 1 byte each way (compare BenchmarkNewConnProxy and BenchmarkNewStreamQUIC).
func BenchmarkReverseNewSession(b *testing.B) {
	for _, tc := range reverseCases {
		b.Run(tc.mode+"/"+tc.transport, func(b *testing.B) {
			r := newReverseBench(b, tc.mode, tc.transport, testnet.Echo(b))
			oneByteEachWay(b, r.dial(b, tc.mode)) // warm: connections, session tickets
			var took []time.Duration
			for b.Loop() {
				start := time.Now()
				oneByteEachWay(b, r.dial(b, tc.mode))
				took = append(took, time.Since(start))
			}
			slices.Sort(took)
			b.ReportMetric(float64(took[len(took)/2])/1e6, "p50-ms")
			b.ReportMetric(float64(took[len(took)*99/100])/1e6, "p99-ms")
			checkProtectedPath(b, r, tc.mode, b.N)
		})
	}
}

// startReverseAgent runs a relay with reverse zone "rev.test" (every public port
// allowed) and an agent for exposed over transport, whose protected name
// protected.rev.test has a certificate from the test CA; it returns once the
// agent registered.
func startReverseAgent(b *testing.B, transport, protected string, exposed []clients.Exposed) *quicEnv {
	b.Helper()
	q := newQUICEnv(b, func(c *proxy.Config) {
		c.Reverse = proxy.ReverseOptions{Zone: "rev.test", PublicHost: "127.0.0.1",
			PublicPorts: func(string, int) bool { return true }}
	}, proxy.QUICOptions{})
	agentCert := q.ca.ServerCert(b, protected+".rev.test")
	ad := q.dialer()
	ad.Transport = transport
	registered := make(chan struct{}, 1)
	a := &clients.Agent{
		Dialer:      ad,
		Exposed:     exposed,
		AllowUsers:  []string{"alice"},
		Certificate: func(context.Context, string) (*tls.Certificate, error) { return &agentCert, nil },
		Registered:  func([]string) { notify(registered) },
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx); ad.Close() }()
	b.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			b.Error("the agent did not end within 30s of being told to stop")
		}
	})
	select {
	case <-registered:
	case err := <-done:
		b.Fatalf("agent: %v", err)
	case <-time.After(30 * time.Second):
		b.Fatal("agent did not register")
	}
	return q
}
