package e2e

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// ipBenchCounts are the counters a benchmark of BenchmarkIPTunnel reads
// before and after its loop, so that each figure comes with the losses it
// suffered: the inner TCP's retransmissions (the sender's namespace) and the
// drops tpd counts (quic-go's receive queue, the tunnels' own).
type ipBenchCounts struct {
	retrans, outSegs float64
	udpOut, udpIn    float64 // the sender namespace's UDP datagrams (QUIC's packets, WireGuard's)
	tpdQUICQueue     float64 // tp_udp_datagrams_dropped_total{reason="quic_queue_full"}: quic-go's 128 DATAGRAM frames
	tpdQUICPackets   float64 // tp_udp_datagrams_dropped_total{reason="quic_packet_queue_full"}: quic-go's 256 packets
	tpdIPDropped     float64 // tp_ip_packets_dropped_total, every reason
	// tp_quic_socket_reads_total and _packets_total: how many packets a
	// read of tpd's UDP socket brings (more than 8 when the kernel coalesces).
	tpdSocketReads, tpdSocketPackets float64
	// CPU time so far: tpd's, every tp process's (tp ip, tp forward) and
	// the whole machine's (both ends' kernels, the services, the benchmark).
	tpdCPU, tpCPU, hostCPU time.Duration
	wgCPU                  time.Duration // both wireguard-go processes'
	relayCPU               time.Duration // both halves of the raw quic-go relay
}

// readIPBenchCounts reads the counters; sender is the namespace whose TCP sends.
func readIPBenchCounts(b *testing.B, n *ipNet, sender string) ipBenchCounts {
	b.Helper()
	c := ipBenchCounts{tpdCPU: procCPU(b, n.tpd.cmd.Process.Pid), tpCPU: tpCPU(b), hostCPU: hostCPU(b), wgCPU: commCPU(b, "wireguard"),
		relayCPU: commCPU(b, relayComm)}
	tpdNS := n.T
	out, err := exec.Command("ip", "netns", "exec", sender, "cat", "/proc/net/snmp").Output()
	if err != nil {
		b.Fatalf("reading %s's TCP counters: %v", sender, err)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || (f[0] != "Tcp:" && f[0] != "Udp:") {
			continue
		}
		if len(names) == 0 || names[0] != f[0] {
			names = f // the header line of its protocol
			continue
		}
		for i := 1; i < len(f) && i < len(names); i++ {
			v, _ := strconv.ParseFloat(f[i], 64)
			switch f[0] + names[i] {
			case "Tcp:RetransSegs":
				c.retrans = v
			case "Tcp:OutSegs":
				c.outSegs = v
			case "Udp:OutDatagrams":
				c.udpOut = v
			case "Udp:InDatagrams":
				c.udpIn = v
			}
		}
		names = nil
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
		case f[0] == "tp_quic_socket_reads_total":
			c.tpdSocketReads = v
		case f[0] == "tp_quic_socket_packets_total":
			c.tpdSocketPackets = v
		}
	}
	return c
}

// reportEchoes adds, per round trip of echoes, the UDP datagrams the client
// host sent and received (each QUIC or WireGuard packet) and the CPU time
// of tp, tpd, wireguard-go, the raw quic-go relay and the whole machine.
func (c ipBenchCounts) reportEchoes(b *testing.B, before ipBenchCounts, echoes int) {
	e := float64(echoes)
	b.ReportMetric((c.udpOut-before.udpOut)/e, "udp-out/echo")
	b.ReportMetric((c.udpIn-before.udpIn)/e, "udp-in/echo")
	b.ReportMetric(float64((c.tpCPU-before.tpCPU).Microseconds())/e, "tp-cpu-µs/echo")
	b.ReportMetric(float64((c.tpdCPU-before.tpdCPU).Microseconds())/e, "tpd-cpu-µs/echo")
	b.ReportMetric(float64((c.wgCPU-before.wgCPU).Microseconds())/e, "wg-cpu-µs/echo")
	b.ReportMetric(float64((c.relayCPU-before.relayCPU).Microseconds())/e, "relay-cpu-µs/echo")
	b.ReportMetric(float64((c.hostCPU-before.hostCPU).Microseconds())/e, "host-cpu-µs/echo")
}

// report adds the differences since before as the benchmark's metrics; bytes
// is what the loop moved, for the CPU time per MiB.
func (c ipBenchCounts) report(b *testing.B, before ipBenchCounts, bytes int64) {
	if mib := float64(bytes) / (1 << 20); mib > 0 {
		b.ReportMetric(float64((c.tpdCPU-before.tpdCPU).Milliseconds())/mib, "tpd-cpu-ms/MiB")
		b.ReportMetric(float64((c.tpCPU-before.tpCPU).Milliseconds())/mib, "tp-cpu-ms/MiB")
		b.ReportMetric(float64((c.hostCPU-before.hostCPU).Milliseconds())/mib, "host-cpu-ms/MiB")
		b.ReportMetric(float64((c.relayCPU-before.relayCPU).Milliseconds())/mib, "relay-cpu-ms/MiB")
	}
	segs := c.outSegs - before.outSegs
	if segs > 0 {
		b.ReportMetric(100*(c.retrans-before.retrans)/segs, "retrans-%")
	}
	b.ReportMetric(c.tpdQUICQueue-before.tpdQUICQueue, "tpd-quic-dgram-drops")
	b.ReportMetric(c.tpdQUICPackets-before.tpdQUICPackets, "tpd-quic-pkt-drops")
	b.ReportMetric(c.tpdIPDropped-before.tpdIPDropped, "tpd-ip-drops")
	if reads := c.tpdSocketReads - before.tpdSocketReads; reads > 0 {
		b.ReportMetric((c.tpdSocketPackets-before.tpdSocketPackets)/reads, "tpd-pkts/read")
	}
}
