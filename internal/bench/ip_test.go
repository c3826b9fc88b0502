package bench

import (
	"slices"
	"testing"
)

// Lines as BenchmarkIPTunnel prints them (go test -bench -count 2), a
// skipped sub-benchmark and lines that are no figures.
const ipBenchOutput = `goos: linux
BenchmarkIPTunnel/direct/throughput-2         	      10	  10622566 ns/op	1579.39 MB/s	         0.3010 retrans-%	         0 tpd-ip-drops	         0 tpd-quic-dgram-drops	         0 tpd-quic-pkt-drops
BenchmarkIPTunnel/tp-ip-quic/throughput-2     	      10	 154042902 ns/op	 108.91 MB/s	         6.822 retrans-%	         0 tpd-ip-drops	         0 tpd-quic-dgram-drops	         0 tpd-quic-pkt-drops
BenchmarkIPTunnel/tp-ip-quic/rtt-2            	      10	    281188 ns/op
BenchmarkIPTunnel/tp-forward/rtt-2            	      10	    301188 ns/op	    244100 p50-ns	    914000 p99-ns
BenchmarkIPTunnel/tp-ip-quic-datagrams/upload-2	      10	 154042902 ns/op	  45.20 MB/s	        15.10 host-cpu-ms/MiB	         6.014 retrans-%	         4.100 tp-cpu-ms/MiB
    ip_bench_test.go:203: tp ip --transport quic: time=... msg="IP tunnel connection ended"
    --- SKIP: BenchmarkIPTunnel/wireguard-go
BenchmarkIPTunnel/tp-forward-tls/upload-2     	      10	  34344705 ns/op	 488.49 MB/s	         0.4666 retrans-%	         0 tpd-ip-drops	         0 tpd-quic-dgram-drops	         0 tpd-quic-pkt-drops
BenchmarkIPTunnel/tp-ip-quic/throughput-2     	      10	 148933960 ns/op	 112.65 MB/s	         6.063 retrans-%	         0 tpd-ip-drops	         0 tpd-quic-dgram-drops	         0 tpd-quic-pkt-drops
BenchmarkIPTunnel/unknown-path/throughput-2   	      10	 148933960 ns/op	 1.00 MB/s
PASS
`

func TestParseIPBench(t *testing.T) {
	got, skipped := parseIPBench(ipBenchOutput)
	for name, want := range map[string][]float64{
		"plain routing, download":                          {1579.39},
		"tp ip, HTTP/3, download":                          {108.91, 112.65},
		"tp ip, HTTP/3, download, inner TCP retransmitted": {6.822, 6.063},
		"tp ip, HTTP/3, TCP echo round trip (median)":      {281.188}, // a line with no median: its mean
		"tp forward, QUIC, TCP echo round trip (median)":   {244.1},
		"tp forward, TLS, upload":                          {488.49},
		"tp forward, TLS, upload, inner TCP retransmitted": {0.4666},
		// the CPU metrics sort before the retransmissions
		"tp ip, HTTP/3, TCP in datagrams, upload":                          {45.20},
		"tp ip, HTTP/3, TCP in datagrams, upload, inner TCP retransmitted": {6.014},
	} {
		if !slices.Equal(got[name], want) {
			t.Errorf("%s: %v, want %v", name, got[name], want)
		}
	}
	if len(got) != 10 {
		t.Errorf("%d variants read, want 10 (an unknown path is no variant): %v", len(got), got)
	}
	if !skipped["wireguard-go"] || len(skipped) != 1 {
		t.Errorf("skipped = %v, want wireguard-go only", skipped)
	}
}
