package tpd

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// BenchmarkMetricsCost measures what metrics cost the data plane: bulk
// throughput through one tunnel and the set-up of new tunnels, with
// admin-listen off, and on with /metrics scraped every 250 ms meanwhile (60
// times Prometheus' usual 15 s). The proxy's own counters (one atomic add per
// session, per refused connection, per QUIC stream) are compiled in either
// way; "on" adds the timed policy decision and the scrapes. Run the settings
// interleaved and compare medians:
//
//	go test -run XXX -bench MetricsCost -count 10 ./internal/server/tpd/
func BenchmarkMetricsCost(b *testing.B) {
	for _, setting := range []string{"off", "on"} {
		b.Run("bulk/metrics="+setting, func(b *testing.B) { benchBulk(b, setting == "on") })
	}
	for _, setting := range []string{"off", "on"} {
		b.Run("newtunnel/metrics="+setting, func(b *testing.B) { benchNewTunnel(b, setting == "on") })
	}
}

// benchBulk sends 1 MiB chunks through one TLS tunnel, each answered by one byte.
func benchBulk(b *testing.B, on bool) {
	dl, _ := metricsBenchDialer(b, on)
	const chunk = 1 << 20
	conn, err := dl.DialContext(context.Background(), "tcp", chunkServer(b, chunk))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, chunk)
	ack := make([]byte, 1)
	b.SetBytes(chunk)
	for b.Loop() {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(conn, ack); err != nil {
			b.Fatal(err)
		}
	}
}

// benchNewTunnel opens a TLS tunnel (handshake or resumption, hello, policy,
// dial) and closes it once the server said ok. The destination closes when
// the client does, so each session ends.
func benchNewTunnel(b *testing.B, on bool) {
	dl, _ := metricsBenchDialer(b, on)
	dest := testnet.Echo(b)
	for b.Loop() {
		conn, err := dl.DialContext(context.Background(), "tcp", dest)
		if err != nil {
			b.Fatal(err)
		}
		conn.Close()
	}
}

// metricsBenchDialer runs a tpd (admin-listen on or off; on: a scraper runs
// until the benchmark ends) and returns alice's TLS dialer.
func metricsBenchDialer(b *testing.B, on bool) (*clients.Dialer, string) {
	admin := ""
	if on {
		admin = "127.0.0.1:0"
	}
	r, admin := adminDaemon(b, allowAlice, admin)
	d, url := r.d, r.url
	if on {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			hc := &http.Client{Timeout: 5 * time.Second}
			t := time.NewTicker(250 * time.Millisecond)
			defer t.Stop()
			for {
				if resp, err := hc.Get("http://" + admin + "/metrics"); err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		}()
		b.Cleanup(func() { cancel(); <-done })
	}
	c, _, _ := enrollClient(b, d, url, "alice", "laptop")
	dl, err := c.Dialer()
	if err != nil {
		b.Fatal(err)
	}
	dl.Transport = clients.TransportTLS
	b.Cleanup(func() { dl.Close() })
	return dl, url
}

// chunkServer reads chunk bytes and answers one byte, for as long as the
// connection lasts.
func chunkServer(b *testing.B, chunk int) string {
	return testnet.Serve(b, func(c *net.TCPConn) {
		buf := make([]byte, chunk)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write([]byte{1}); err != nil {
				return
			}
		}
	})
}

type allowAll struct{}

func (allowAll) Authorize(context.Context, authz.Request) (authz.Decision, error) {
	return authz.Decision{Allow: true}, nil
}

// BenchmarkMeteredDecision is what metrics add to each policy decision (a
// new tunnel makes one): timing it, the histogram and the counter. The
// decision itself is a stub here, so the difference is the overhead.
//
//	go test -run XXX -bench MeteredDecision -count 5 ./internal/server/tpd/
func BenchmarkMeteredDecision(b *testing.B) {
	r, _ := adminDaemon(b, allowAlice, "127.0.0.1:0")
	req := authz.Request{Action: authz.ActionDial}
	for _, c := range []struct {
		name string
		a    authz.Authorizer
	}{{"metrics=off", allowAll{}}, {"metrics=on", r.d.metrics.authorizer(allowAll{})}} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := c.a.Authorize(context.Background(), req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkScrape is one /metrics scrape, rendered and read over loopback.
func BenchmarkScrape(b *testing.B) {
	_, admin := adminDaemon(b, allowAlice, "127.0.0.1:0")
	hc := &http.Client{Timeout: 5 * time.Second}
	for b.Loop() {
		resp, err := hc.Get("http://" + admin + "/metrics")
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}
