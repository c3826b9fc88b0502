package e2e

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// natBenchPolicy is natPolicy plus public exposure (the baseline).
const natBenchPolicy = natPolicy + `
allow if {
	input.action == "expose_public"
	input.identity.user == "alice"
}
`

// natPublicPort is tpd's public port in T (a namespace of its own: always free).
const natPublicPort = 24001

// BenchmarkDirectPath measures, in one run between the NAT namespaces of
// natNet (endpoint-independent NATs; every byte crosses both NATs and T's
// forwarding, as a direct path would on the Internet), the ways alice's
// service in A reaches bob in D:
//
//   - bulk/public: plain TCP to tpd's public port, tpd relays to the agent
//     (tp expose --public): the baseline of the issue, "public mode";
//   - bulk/relayed: a protected session through tpd (tp forward, one
//     end-to-end carrier);
//   - bulk/direct: a protected session on the direct path (tp --direct forward);
//   - session/relayed, session/direct: a new session on an established
//     carrier or pair, connect to a 1-byte echo.
//
// Each bulk sub-benchmark also reports tpd's CPU time per MiB carried
// (tpd-cpu-ms/MiB) and the whole machine's (host-cpu-ms/MiB: every process
// and the kernel's forwarding between the namespaces), and bulk/direct the time from tp forward's first session
// to the direct path (ms-to-direct).
func BenchmarkDirectPath(b *testing.B) {
	n := newNATNetWith(b, false, natBenchPolicy, []string{"TP_PUBLIC_PORTS=" + strconv.Itoa(natPublicPort)})
	var sink, echo string
	inNS(b, n.A, func() {
		sink = testnet.Serve(b, func(c *net.TCPConn) {
			_, _ = io.Copy(io.Discard, c)
			_ = c.CloseWrite()
		})
		echo = testnet.Echo(b)
	})
	startExposeIn(b, n.A, n.alice, "sink", sink, "--allow-user", "bob")
	echoLog, _ := startExposeIn(b, n.A, n.alice, "echo", echo, "--allow-user", "bob")
	startExposeIn(b, n.A, n.alice, "psink", sink, "--public", strconv.Itoa(natPublicPort))

	relayedSink := n.forward(b, false, "sink")
	relayedEcho := n.forward(b, false, "echo")
	start := time.Now()
	directSink, directLog := n.forwardLog(b, true, "sink")
	directEcho := n.forward(b, true, "echo")
	// The first session opens the pair; the bulk runs once it went direct.
	n.bulk(b, directSink, 1<<20)
	waitFor(b, 30*time.Second, "the pair for sink on the direct path", func() bool {
		return strings.Contains(directLog.String(), "moved to a direct path")
	})
	toDirect := directTime(directLog, start)
	n.session(b, directEcho)
	waitFor(b, 30*time.Second, "the pair for echo on the direct path", func() bool {
		return strings.Contains(echoLog.String(), "moved to a direct path")
	})

	const size = 64 << 20
	for _, v := range []struct{ name, addr string }{
		{"public", net.JoinHostPort(natTPD, strconv.Itoa(natPublicPort))},
		{"relayed", relayedSink},
		{"direct", directSink},
	} {
		b.Run("bulk/"+v.name, func(b *testing.B) {
			n.bulk(b, v.addr, 1<<20)
			b.SetBytes(size)
			cpu0, host0, tp0 := procCPU(b, n.tpd.cmd.Process.Pid), hostCPU(b), tpCPU(b)
			b.ResetTimer()
			for range b.N {
				n.bulk(b, v.addr, size)
			}
			b.StopTimer()
			cpu, host, tp := procCPU(b, n.tpd.cmd.Process.Pid)-cpu0, hostCPU(b)-host0, tpCPU(b)-tp0
			mib := float64(b.N * size >> 20)
			b.ReportMetric(float64(cpu.Milliseconds())/mib, "tpd-cpu-ms/MiB")
			b.ReportMetric(float64(host.Milliseconds())/mib, "host-cpu-ms/MiB")
			b.ReportMetric(float64(tp.Milliseconds())/mib, "tp-cpu-ms/MiB")
			if v.name == "direct" {
				b.ReportMetric(float64(toDirect.Milliseconds()), "ms-to-direct")
			}
		})
	}
	for _, v := range []struct{ name, addr string }{{"relayed", relayedEcho}, {"direct", directEcho}} {
		b.Run("session/"+v.name, func(b *testing.B) {
			n.session(b, v.addr)
			b.ResetTimer()
			for range b.N {
				for range sessionsPerOp {
					n.session(b, v.addr)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*sessionsPerOp)/1000, "ms/session")
		})
	}
}

// sessionsPerOp: each op of the session sub-benchmarks is this many new
// sessions one after the other, so that a few ops give a steady figure
// (ms/session).
const sessionsPerOp = 40

// forward runs bob's tp forward (with --direct when direct) in D from a port
// of D's loopback to name's port 22, and returns that port's address.
func (n *natNet) forward(b testing.TB, direct bool, name string) string {
	addr, _ := n.forwardLog(b, direct, name)
	return addr
}

func (n *natNet) forwardLog(b testing.TB, direct bool, name string, extra ...string) (string, *testlog.Buffer) {
	b.Helper()
	args := append([]string{"netns", "exec", n.D, binary("tp"), "--debug"}, extra...)
	if direct {
		args = append(args, "--direct")
	}
	cmd := command("ip", append(args, "forward", "127.0.0.1:0", name+".rev.tp.internal:22")...)
	cmd.Env = append(os.Environ(), n.bob...)
	log := &testlog.Buffer{}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	re := regexp.MustCompile(`Forwarding (127\.0\.0\.1:\d+) to`)
	var addr string
	waitFor(b, 30*time.Second, "tp forward's listening line", func() bool {
		m := re.FindStringSubmatch(log.String())
		if m != nil {
			addr = m[1]
		}
		return m != nil
	})
	return addr, log
}

// bulk sends size bytes to the sink behind addr (a connection made in D) and
// waits for its end.
func (n *natNet) bulk(b testing.TB, addr string, size int) {
	b.Helper()
	var c net.Conn
	var err error
	inNS(b, n.D, func() { c, err = net.DialTimeout("tcp", addr, 10*time.Second) })
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	for left := size; left > 0; left -= len(buf) {
		if _, err := c.Write(buf[:min(len(buf), left)]); err != nil {
			b.Fatalf("bulk to %s: %v", addr, err)
		}
	}
	_ = c.(*net.TCPConn).CloseWrite()
	_ = c.SetReadDeadline(time.Now().Add(time.Minute))
	if _, err := io.Copy(io.Discard, c); err != nil {
		b.Fatalf("bulk to %s: the end: %v", addr, err)
	}
}

// session connects to the echo behind addr, has one byte echoed, and closes.
func (n *natNet) session(b testing.TB, addr string) {
	b.Helper()
	var c net.Conn
	var err error
	inNS(b, n.D, func() { c, err = net.DialTimeout("tcp", addr, 10*time.Second) })
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	var one [1]byte
	if _, err := c.Write([]byte{'x'}); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(c, one[:]); err != nil {
		b.Fatalf("an echo through %s: %v", addr, err)
	}
}

// procCPU is the user and system CPU time pid used so far.
func procCPU(b testing.TB, pid int) time.Duration {
	b.Helper()
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ
}

// hostCPU is the CPU time the whole machine spent busy so far (every process
// and the kernel's forwarding and NAT between the namespaces), over all cores.
func hostCPU(b testing.TB) time.Duration {
	b.Helper()
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(strings.SplitN(string(raw), "\n", 2)[0]) // cpu user nice system idle iowait irq softirq steal
	var busy int64
	for i, v := range f[1:min(len(f), 9)] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		busy += n
	}
	return time.Duration(busy) * time.Second / 100 // USER_HZ
}

// tpCPU is the CPU time TP's clients (every tp process: the agents and the
// dialers) used so far.
func tpCPU(b testing.TB) time.Duration { return commCPU(b, "tp") }

// commCPU is the CPU time every process named comm used so far.
func commCPU(b testing.TB, comm string) time.Duration {
	b.Helper()
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	var total time.Duration
	for _, f := range stats {
		raw, err := os.ReadFile(f)
		if err != nil || !strings.Contains(string(raw), " ("+comm+") ") {
			continue
		}
		pid, _ := strconv.Atoi(strings.Fields(string(raw))[0])
		total += procCPU(b, pid)
	}
	return total
}

// directTime is how long after start the log said the pair moved to a direct path.
func directTime(log *testlog.Buffer, start time.Time) time.Duration {
	m := regexp.MustCompile(`time=(\S+) level=DEBUG msg="tp: the sessions with the agent moved to a direct path"`).FindStringSubmatch(log.String())
	if m == nil {
		return 0
	}
	at, err := time.Parse(time.RFC3339Nano, m[1])
	if err != nil {
		return 0
	}
	return at.Sub(start)
}
