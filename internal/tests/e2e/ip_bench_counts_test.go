package e2e

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// ipBenchCounts are the counters a benchmark of BenchmarkIPTunnel reads
// before and after its loop, so that each figure comes with the losses it
// suffered: the inner TCP's retransmissions (the sender's namespace) and the
// drops tpd counts (quic-go's receive queue, the tunnels' own).
type ipBenchCounts struct {
	retrans, outSegs float64
	tpdQUICQueue     float64 // tp_udp_datagrams_dropped_total{reason="quic_queue_full"}: quic-go's 128 DATAGRAM frames
	tpdQUICPackets   float64 // tp_udp_datagrams_dropped_total{reason="quic_packet_queue_full"}: quic-go's 256 packets
	tpdIPDropped     float64 // tp_ip_packets_dropped_total, every reason
}

// readIPBenchCounts reads the counters; sender is the namespace whose TCP sends.
func readIPBenchCounts(b *testing.B, sender, tpdNS string) ipBenchCounts {
	b.Helper()
	var c ipBenchCounts
	out, err := exec.Command("ip", "netns", "exec", sender, "cat", "/proc/net/snmp").Output()
	if err != nil {
		b.Fatalf("reading %s's TCP counters: %v", sender, err)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Tcp:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i := 1; i < len(f) && i < len(names); i++ {
			v, _ := strconv.ParseFloat(f[i], 64)
			switch names[i] {
			case "RetransSegs":
				c.retrans = v
			case "OutSegs":
				c.outSegs = v
			}
		}
	}
	m, err := exec.Command("ip", "netns", "exec", tpdNS, "curl", "-s", "--max-time", "10", "http://127.0.0.1:9464/metrics").Output()
	if err != nil {
		b.Fatalf("scraping tpd's metrics: %v", err)
	}
	for _, line := range strings.Split(string(m), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		v, _ := strconv.ParseFloat(f[1], 64)
		switch {
		case f[0] == `tp_udp_datagrams_dropped_total{reason="quic_queue_full"}`:
			c.tpdQUICQueue = v
		case f[0] == `tp_udp_datagrams_dropped_total{reason="quic_packet_queue_full"}`:
			c.tpdQUICPackets = v
		case strings.HasPrefix(f[0], "tp_ip_packets_dropped_total{"):
			c.tpdIPDropped += v
		}
	}
	return c
}

// report adds the differences since before as the benchmark's metrics.
func (c ipBenchCounts) report(b *testing.B, before ipBenchCounts) {
	segs := c.outSegs - before.outSegs
	if segs > 0 {
		b.ReportMetric(100*(c.retrans-before.retrans)/segs, "retrans-%")
	}
	b.ReportMetric(c.tpdQUICQueue-before.tpdQUICQueue, "tpd-quic-dgram-drops")
	b.ReportMetric(c.tpdQUICPackets-before.tpdQUICPackets, "tpd-quic-pkt-drops")
	b.ReportMetric(c.tpdIPDropped-before.tpdIPDropped, "tpd-ip-drops")
}
