package proxy_test

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/website"
	"github.com/tp-proxy/tp/proxy"
)

// The website on TP's shared listener against the same site on a plain Go
// http.Server: a 1 KiB static page over h2, 16 concurrent requests on one
// connection; each with and without a bulk tunnel through TP beside it.
//
//	go test -run XXX -bench Site -benchtime 20000x -count 3 ./proxy/
func BenchmarkSite(b *testing.B) {
	root := b.TempDir()
	page := "<!doctype html><title>bench</title><p>" + strings.Repeat("x", 1000) + "</p>"
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte(page), 0o644); err != nil {
		b.Fatal(err)
	}
	site, err := website.New(website.Options{
		Sites:  []website.Site{{Name: "localhost", Root: root}},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		b.Fatal(err)
	}
	e := newEnv(b, func(c *proxy.Config) {
		c.Web = site
		c.WebNames = site.KnowsName
	})
	// The plain server: the same handler and certificate, its own listener.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	plain := &http.Server{Handler: site, ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{e.ca.ServerCert(b, "localhost")}}}
	go plain.ServeTLS(ln, "", "")
	b.Cleanup(func() { plain.Close() })

	for _, tt := range []struct {
		name, addr string
		bulk       bool
	}{
		{"plain", ln.Addr().String(), false},
		{"tp", e.addr, false},
		{"plain+bulk", ln.Addr().String(), true},
		{"tp+bulk", e.addr, true},
	} {
		b.Run(tt.name, func(b *testing.B) {
			if tt.bulk {
				stop := e.bulkTunnel(b)
				defer stop()
			}
			benchH2(b, e, tt.addr, len(page))
		})
	}
}

// bulkTunnel moves 1 MiB writes through TP to a sink until stopped.
func (e *env) bulkTunnel(b *testing.B) (stop func()) {
	sink, counts := startSink(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := e.dialer().DialContext(ctx, "tcp", sink)
	if err != nil {
		b.Fatal(err)
	}
	var done atomic.Bool
	var moved atomic.Int64
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		buf := make([]byte, benchChunk)
		for !done.Load() {
			n, err := c.Write(buf)
			moved.Add(int64(n))
			if err != nil {
				return
			}
		}
		_ = c.(interface{ CloseWrite() error }).CloseWrite()
		<-counts
	}()
	start := time.Now()
	return func() {
		done.Store(true)
		<-finished
		c.Close()
		b.ReportMetric(float64(moved.Load())/time.Since(start).Seconds()/1e6, "tunnel-MB/s")
	}
}

func benchH2(b *testing.B, e *env, addr string, size int) {
	tr := &http.Transport{
		TLSClientConfig:   e.clientTLS(nil),
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		},
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	get := func() {
		resp, err := client.Get("https://localhost/")
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.ProtoMajor != 2 || int(n) != size {
			b.Fatalf("%s %s, %d bytes", resp.Status, resp.Proto, n)
		}
	}
	get() // the connection is up before the clock starts

	const workers = 16
	var next atomic.Int64
	lat := make([][]time.Duration, workers)
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				t0 := time.Now()
				get()
				lat[w] = append(lat[w], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	all := slices.Concat(lat...)
	slices.Sort(all)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
	b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(all[len(all)/2].Microseconds()), "p50-µs")
}
