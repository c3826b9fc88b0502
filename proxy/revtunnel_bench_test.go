package proxy_test

import (
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
)

// BenchmarkReverseHTTP: a small page through ReverseHTTP (the round-tripper
// tpd's website uses) over tunnels that tp expose --http holds, h2 inside and
// HTTP/1.1 inside, against the same app reached directly with net/http. It
// reports requests/s and the p99 latency over all requests of the run.
func BenchmarkReverseHTTP(b *testing.B) {
	page := []byte("<html><body><h1>hello</h1></body></html>\n")
	local := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		_, _ = w.Write(page)
	}))
	b.Cleanup(local.Close)
	u, _ := url.Parse(local.URL)

	b.Run("direct", func(b *testing.B) {
		tr := &http.Transport{MaxIdleConnsPerHost: 64}
		b.Cleanup(tr.CloseIdleConnections)
		rtBenchGet(b, tr, local.URL+"/")
	})
	for _, h1 := range []bool{false, true} {
		name := "tunnel-h2"
		if h1 {
			name = "tunnel-http1"
		}
		b.Run(name, func(b *testing.B) {
			e := newRTEnv(b)
			ctx, cancel := context.WithCancel(context.Background())
			const tunnels = 8
			ready := make(chan string, 1024)
			x := &clients.HTTPExposer{Server: e.addr, ProxyName: "proxy.localhost",
				TLSConfig: &tls.Config{RootCAs: e.ca.Pool, Certificates: []tls.Certificate{e.alice}},
				Name:      "blog", Local: u, Tunnels: tunnels, H1Only: h1, Logger: discardLogger(),
				Established: func(s string) {
					select {
					case ready <- s:
					default:
					}
				}}
			done := make(chan error, 1)
			go func() { done <- x.Run(ctx) }()
			b.Cleanup(func() { cancel(); <-done })
			for range tunnels {
				<-ready
			}
			rt, ok := e.srv.ReverseHTTP("blog.rev.test")
			if !ok {
				b.Fatal("no tunnel holds blog.rev.test")
			}
			rtBenchGet(b, rt, "https://blog.rev.test/")
		})
	}
}

func rtBenchGet(b *testing.B, rt http.RoundTripper, target string) {
	var mu sync.Mutex
	var lat []time.Duration
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		var mine []time.Duration
		for pb.Next() {
			t0 := time.Now()
			req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, target, nil)
			resp, err := rt.RoundTrip(req)
			if err != nil {
				b.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			mine = append(mine, time.Since(t0))
		}
		mu.Lock()
		lat = append(lat, mine...)
		mu.Unlock()
	})
	elapsed := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	if len(lat) > 0 {
		b.ReportMetric(float64(len(lat))/elapsed.Seconds(), "req/s")
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	}
}
