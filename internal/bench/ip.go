package bench

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Scenario "ip": IP tunnels (`tp ip`) beside wireguard-go. It runs the
// repository's namespace benchmark, BenchmarkIPTunnel in internal/tests/e2e:
// a client host, a TP host running tpd and a service host, each a network
// namespace, joined by veth pairs; 16 MiB TCP transfers each way and a 1-byte
// TCP echo from client to service host, plainly routed (the baseline),
// through `tp ip` over HTTP/3 and over HTTP/2, through wireguard-go between
// the client and the TP host (when the peers name it), through `tp
// forward` over QUIC and over TLS (the ceilings the goal names) and through
// tpbench's raw quic-go relay (the floor under TP's QUIC paths). Each run is a
// fresh round of all paths (a go test of its own), so the ratios are taken
// per run. It needs Linux, root and iproute2, and the Go toolchain (the
// benchmark is a test of this tree).

// ipPaths are the benchmark's sub-benchmarks and their names in the table.
var ipPaths = []struct{ bench, name, transport string }{
	{"direct", "plain routing", "tcp"},
	{"tp-ip-quic", "tp ip, HTTP/3", "quic"},
	{"tp-ip-quic-packets", "tp ip, HTTP/3, TCP in packets", "quic"},
	{"tp-ip-quic-datagrams", "tp ip, HTTP/3, TCP in datagrams", "quic"},
	{"tp-ip-tls", "tp ip, HTTP/2", "tls"},
	{"tp-ip-tls-packets", "tp ip, HTTP/2, TCP in packets", "tls"},
	{"wireguard-go", "wireguard-go", "udp"},
	{"tp-forward", "tp forward, QUIC", "quic"},
	{"tp-forward-tls", "tp forward, TLS", "tls"},
	{"raw-quic-go", "raw quic-go relay", "quic"},
}

var ipMetrics = []struct{ bench, name, unit string }{
	{"throughput", "download", "MB/s"},
	{"upload", "upload", "MB/s"},
	{"rtt", "TCP echo round trip (median)", "µs"},
}

// ipLine is one result line of BenchmarkIPTunnel.
// The retransmissions may follow other metrics (go test sorts them by unit).
var ipLine = regexp.MustCompile(`^BenchmarkIPTunnel/([\w-]+)/(throughput|upload|rtt)-\d+\s+\d+\s+([\d.]+) ns/op(?:\s+([\d.]+) MB/s)?(?:.*?\s([\d.]+) retrans-%)?`)

// ipMedian is the median round trip on an rtt line (ns/op is their mean).
var ipMedian = regexp.MustCompile(`\s([\d.]+) p50-ns`)

// ipSkipped is a sub-benchmark's skip line and its reason.
var ipSkipped = regexp.MustCompile(`^\s+--- SKIP: BenchmarkIPTunnel/([\w-]+)`)

func ipScenario(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "ip tunnels"
	name := func(path, metric string) string { return path + ", " + metric }
	rows := map[string]*Row{}
	var order []string
	for _, p := range ipPaths {
		for _, m := range ipMetrics {
			n := name(p.name, m.name)
			rows[n] = &Row{Scenario: scn, Variant: n, Transport: p.transport, Unit: m.unit}
			order = append(order, n)
			if strings.HasPrefix(p.bench, "tp-ip-") {
				if m.bench != "rtt" {
					rt := name(p.name, m.name+", inner TCP retransmitted")
					rows[rt] = &Row{Scenario: scn, Variant: rt, Transport: p.transport, Unit: "%"}
					order = append(order, rt)
				}
			}
		}
	}
	fail := func(why string) []Row {
		var out []Row
		for _, n := range order {
			r := *rows[n]
			r.Err = why
			out = append(out, r)
		}
		return out
	}
	if runtime.GOOS != "linux" || os.Geteuid() != 0 {
		return fail("needs root on Linux (network namespaces and tun devices)"), nil
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fail("needs iproute2's ip command"), nil
	}
	root, err := moduleRoot(ctx)
	if err != nil {
		return fail(err.Error()), nil
	}
	wg := "none"
	if p, ok := e.peers.path[peerWireGuard]; ok {
		wg = p
	}
	// One go test per run: -count would repeat each sub-benchmark in place
	// (go test repeats the leaves), so a run's paths would not be measured
	// together.
	args := []string{"test", "-run", "^$", "-bench", "^BenchmarkIPTunnel$", "-benchtime", fmt.Sprintf("%dx", sz.ipOps),
		"-count", "1", "-timeout", "900s", "./internal/tests/e2e"}
	e.log("  go %s (wireguard-go: %s), %d times", strings.Join(args, " "), wg, runs)
	start := time.Now()
	var all strings.Builder
	for i := range runs {
		e.log("  run %d of %d (%s)", i+1, runs, loadavg())
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "TP_BENCH_WIREGUARD_GO="+wg)
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fail(fmt.Sprintf("the namespace benchmark failed: %v: %s", err, lastLines(string(out), 3))), nil
		}
		all.Write(out)
	}
	figures, skipped := parseIPBench(all.String())
	for k, v := range figures {
		if r := rows[k]; r != nil {
			r.Runs = v
		}
	}
	e.log("  the namespace benchmark took %v", time.Since(start).Round(time.Second))
	var res []Row
	for _, n := range order {
		r := rows[n]
		if len(r.Runs) == 0 {
			switch {
			case strings.HasPrefix(n, "wireguard-go") && wg == "none":
				r.Err = e.peers.why(peerWireGuard)
			case strings.HasPrefix(n, "wireguard-go") && skipped["wireguard-go"]:
				r.Err = "wireguard-go did not start (see go test's output)"
			default:
				r.Err = "no figure in the benchmark's output"
			}
		}
		res = append(res, *r)
	}
	for _, c := range []struct{ num, den, target string }{
		{"tp ip, HTTP/3, download", "tp forward, QUIC, download", "≥0.8×"},
		{"tp ip, HTTP/3, upload", "tp forward, QUIC, upload", "≥0.8×"},
		{"tp ip, HTTP/3, download", "wireguard-go, download", "≥1.0×"},
		{"tp ip, HTTP/3, upload", "wireguard-go, upload", "≥1.0×"},
		{"tp ip, HTTP/3, TCP echo round trip (median)", "wireguard-go, TCP echo round trip (median)", "≤1.2×"},
		{"tp ip, HTTP/3, TCP in packets, download", "tp forward, QUIC, download", ""},
		{"tp ip, HTTP/3, TCP in packets, upload", "tp forward, QUIC, upload", ""},
		{"tp ip, HTTP/3, TCP in datagrams, download", "tp forward, QUIC, download", ""},
		{"tp ip, HTTP/3, TCP in datagrams, upload", "tp forward, QUIC, upload", ""},
		{"tp ip, HTTP/2, download", "tp forward, TLS, download", "≥0.5×"},
		{"tp ip, HTTP/2, upload", "tp forward, TLS, upload", "≥0.5×"},
		{"tp ip, HTTP/2, TCP in packets, download", "tp forward, TLS, download", ""},
		{"tp ip, HTTP/2, TCP in packets, upload", "tp forward, TLS, upload", ""},
		{"tp ip, HTTP/2, download", "wireguard-go, download", ""},
		{"tp ip, HTTP/2, upload", "wireguard-go, upload", ""},
		// The floor over quic-go: its round trip against wireguard-go's,
		// and TP's two QUIC paths against it.
		{"raw quic-go relay, TCP echo round trip (median)", "wireguard-go, TCP echo round trip (median)", ""},
		{"tp ip, HTTP/3, TCP echo round trip (median)", "raw quic-go relay, TCP echo round trip (median)", ""},
		{"tp forward, QUIC, TCP echo round trip (median)", "raw quic-go relay, TCP echo round trip (median)", ""},
		{"tp forward, QUIC, download", "raw quic-go relay, download", ""},
	} {
		num, den := rows[c.num], rows[c.den]
		if len(num.Runs) == 0 || len(den.Runs) == 0 {
			continue
		}
		res = append(res, ratioRow(scn, c.num+" ÷ "+strings.TrimSuffix(c.den, ", "+lastField(c.den))+" (per run)", num, den, c.target))
	}
	return res, nil
}

// parseIPBench reads BenchmarkIPTunnel's output: each row's figures by
// variant name (one per run, in order), and the sub-benchmarks it skipped.
func parseIPBench(out string) (map[string][]float64, map[string]bool) {
	byBench := map[string]string{}
	for _, p := range ipPaths {
		byBench[p.bench] = p.name
	}
	metricName := map[string]string{}
	for _, m := range ipMetrics {
		metricName[m.bench] = m.name
	}
	figures := map[string][]float64{}
	skipped := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if m := ipSkipped.FindStringSubmatch(line); m != nil {
			skipped[m[1]] = true
			continue
		}
		m := ipLine.FindStringSubmatch(line)
		if m == nil || byBench[m[1]] == "" {
			continue
		}
		n := byBench[m[1]] + ", " + metricName[m[2]]
		if m[2] == "rtt" {
			ns, _ := strconv.ParseFloat(m[3], 64)
			if p := ipMedian.FindStringSubmatch(line); p != nil {
				ns, _ = strconv.ParseFloat(p[1], 64)
			}
			figures[n] = append(figures[n], ns/1000)
			continue
		}
		mbs, _ := strconv.ParseFloat(m[4], 64)
		figures[n] = append(figures[n], mbs)
		if m[5] != "" {
			v, _ := strconv.ParseFloat(m[5], 64)
			figures[n+", inner TCP retransmitted"] = append(figures[n+", inner TCP retransmitted"], v)
		}
	}
	return figures, skipped
}

// lastField is what follows the last ", " of s.
func lastField(s string) string {
	if i := strings.LastIndex(s, ", "); i >= 0 {
		return s[i+2:]
	}
	return s
}

// lastLines is the last n lines of s, joined with " | ".
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], " | ")
}
