package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
)

// BenchmarkIPTunnel measures, in the namespaces of TestIPTunnelTPIP and in one
// run, TCP throughput (16 MiB per op) and round-trip time (echoesPerOp 1-byte
// echoes per op, over one connection; their median is p50-ns, their mean
// ns/op) from the client host to the service host: plainly
// routed through T (no tunnel, the baseline), through `tp ip` (CONNECT-IP over
// HTTP/3 and over HTTP/2), through wireguard-go between C and T (built with
// go install from the module proxy; skipped when that fails), and through
// `tp forward` (a TCP stream over TP), and through tpbench's raw quic-go relay
// (each TCP connection a stream of one QUIC connection, nothing of TP's).
// "throughput" is a download (the service host sends), "upload" the other
// direction (through `tp ip`, the server's receive path).
//
//	go test -run '^$' -bench BenchmarkIPTunnel -benchtime 20x ./internal/tests/e2e
func BenchmarkIPTunnel(b *testing.B) {
	const echoesPerOp = 50
	n, env, _ := startIPE2E(b)
	prepareWireGuardRoutes(b, n)
	// Services on S: bulk (16 MiB per connection) and echo, on both addresses:
	// 10.201.2.2 is reached through the tunnel, 10.201.3.1 by plain routing.
	const bulk = 16 << 20
	data := make([]byte, bulk)
	var bulkPort, echoPort, sinkPort string
	for _, a := range []string{"10.201.2.2", "10.201.3.1", wgServiceAddr} {
		inNS(b, n.S, func() {
			bl, err := net.Listen("tcp", a+":"+bulkPort)
			if err != nil {
				b.Error(err)
				return
			}
			el, err := net.Listen("tcp", a+":"+echoPort)
			if err != nil {
				b.Error(err)
				return
			}
			sl, err := net.Listen("tcp", a+":"+sinkPort)
			if err != nil {
				b.Error(err)
				return
			}
			_, bulkPort, _ = net.SplitHostPort(bl.Addr().String())
			_, echoPort, _ = net.SplitHostPort(el.Addr().String())
			_, sinkPort, _ = net.SplitHostPort(sl.Addr().String())
			b.Cleanup(func() { bl.Close(); el.Close(); sl.Close() })
			// The sink answers one byte once it has read all: the upload's end.
			go serveEach(sl, func(c net.Conn) {
				if k, _ := io.Copy(io.Discard, c); k == bulk {
					_, _ = c.Write([]byte{1})
				}
			})
			go serveEach(bl, func(c net.Conn) { _, _ = c.Write(data) })
			go serveEach(el, func(c net.Conn) { _, _ = io.Copy(c, c) })
		})
	}
	if b.Failed() {
		b.FailNow()
	}

	// measure runs the three measurements against the bulk, sink and echo
	// services at those addresses (as the client host reaches them).
	measure := func(b *testing.B, bulkAddr, sinkAddr, echoAddr string) {
		b.Run("throughput", func(b *testing.B) {
			b.SetBytes(bulk)
			before := readIPBenchCounts(b, n, n.S)
			defer func() { readIPBenchCounts(b, n, n.S).report(b, before, int64(b.N)*bulk) }()
			for b.Loop() {
				c := dialIn(b, n.C, bulkAddr)
				if k, err := io.Copy(io.Discard, c); err != nil || k != bulk {
					b.Fatalf("read %d bytes, %v", k, err)
				}
				c.Close()
			}
		})
		b.Run("upload", func(b *testing.B) {
			b.SetBytes(bulk)
			before := readIPBenchCounts(b, n, n.C)
			defer func() { readIPBenchCounts(b, n, n.C).report(b, before, int64(b.N)*bulk) }()
			for b.Loop() {
				c := dialIn(b, n.C, sinkAddr)
				if _, err := c.Write(data); err != nil {
					b.Fatal(err)
				}
				_ = c.(*net.TCPConn).CloseWrite()
				if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
					b.Fatalf("the sink did not confirm %d bytes: %v", bulk, err)
				}
				c.Close()
			}
		})
		b.Run("rtt", func(b *testing.B) {
			c := dialIn(b, n.C, echoAddr)
			one := []byte{1}
			// One echo first, outside the timing: through tp forward the
			// connection reaches the service only now (the tunnel opens on
			// the first bytes), which weighed a few milliseconds on 10 round
			// trips.
			if _, err := c.Write(one); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, one); err != nil {
				b.Fatal(err)
			}
			// An op is echoesPerOp round trips, each timed: the median is
			// the figure (a mean of a few echoes swung 0.7–2.6× between
			// runs with one slow wake-up of a process), ns/op the mean.
			var took []time.Duration
			var sum time.Duration
			before := readIPBenchCounts(b, n, n.C)
			for b.Loop() {
				for range echoesPerOp {
					t0 := time.Now()
					if _, err := c.Write(one); err != nil {
						b.Fatal(err)
					}
					if _, err := io.ReadFull(c, one); err != nil {
						b.Fatal(err)
					}
					d := time.Since(t0)
					took = append(took, d)
					sum += d
				}
			}
			readIPBenchCounts(b, n, n.C).reportEchoes(b, before, len(took))
			slices.Sort(took)
			b.ReportMetric(float64(sum.Nanoseconds())/float64(len(took)), "ns/op")
			b.ReportMetric(float64(took[len(took)/2].Nanoseconds()), "p50-ns")
			b.ReportMetric(float64(took[len(took)*99/100].Nanoseconds()), "p99-ns")
		})
	}
	at := func(b *testing.B, host string) {
		measure(b, net.JoinHostPort(host, bulkPort), net.JoinHostPort(host, sinkPort), net.JoinHostPort(host, echoPort))
	}
	b.Run("direct", func(b *testing.B) { at(b, "10.201.3.1") })

	// tp-ip-quic carries TCP segments whole on the request stream (the
	// default), tp-ip-quic-packets cut into packets there (--no-segments),
	// tp-ip-quic-datagrams every packet in QUIC DATAGRAM frames; the same
	// two ways over HTTP/2.
	for _, v := range []struct{ name, transport, flag string }{
		{"quic", "quic", ""}, {"quic-packets", "quic", "--no-segments"}, {"quic-datagrams", "quic", "--tcp-in-datagrams"},
		{"tls", "tls", ""}, {"tls-packets", "tls", "--no-segments"},
	} {
		b.Run("tp-ip-"+v.name, func(b *testing.B) {
			var extra []string
			if v.flag != "" {
				extra = []string{v.flag}
			}
			stop := runTPIP(b, n.C, env, v.transport, extra...)
			defer stop()
			at(b, "10.201.2.2")
		})
	}

	// The QUIC paths again with 1% of the UDP packets arriving at C and at
	// T dropped at random (iptables' statistic match on INPUT: this kernel
	// has no netem, and a drop on OUTPUT fails the sender's sendmsg, which
	// ends a QUIC connection): what TCP on the stream costs, and saves,
	// when packets are lost.
	b.Run("lossy-1pct", func(b *testing.B) {
		rule := []string{"INPUT", "-p", "udp", "-m", "statistic", "--mode", "random", "--probability", "0.01", "-j", "DROP"}
		for _, ns := range []string{n.C, n.T} {
			sh(b, append([]string{"ip", "netns", "exec", ns, "iptables", "-w", "-A"}, rule...)...)
			b.Cleanup(func() { sh(b, append([]string{"ip", "netns", "exec", ns, "iptables", "-w", "-D"}, rule...)...) })
		}
		for _, v := range []struct{ name, flag string }{{"tp-ip-quic", ""}, {"tp-ip-quic-datagrams", "--tcp-in-datagrams"}} {
			b.Run(v.name, func(b *testing.B) {
				var extra []string
				if v.flag != "" {
					extra = []string{v.flag}
				}
				stop := runTPIP(b, n.C, env, "quic", extra...)
				defer stop()
				at(b, "10.201.2.2")
			})
		}
		b.Run("tp-forward", func(b *testing.B) {
			fwd := func(port string) string { return startForwardIn(b, n.C, env, "quic", "10.201.2.2:"+port) }
			measure(b, fwd(bulkPort), fwd(sinkPort), fwd(echoPort))
		})
	})

	// wireguard-go between C and T (userspace, as tp ip; its default MTU of
	// 1420): the yardstick the goal names.
	b.Run("wireguard-go", func(b *testing.B) {
		b.StopTimer()
		if ok, why := startWireGuardGo(b, n); !ok {
			b.Skip(why)
		}
		b.StartTimer()
		at(b, wgServiceAddr)
	})

	// tp forward: a local port per service, forwarded over TP, over QUIC
	// ("tp-forward", the yardstick of tp ip over HTTP/3) and over TLS
	// ("tp-forward-tls", that of tp ip over HTTP/2).
	for _, tr := range []struct{ name, transport string }{{"tp-forward", "quic"}, {"tp-forward-tls", "tls"}} {
		b.Run(tr.name, func(b *testing.B) {
			fwd := func(port string) string { return startForwardIn(b, n.C, env, tr.transport, "10.201.2.2:"+port) }
			measure(b, fwd(bulkPort), fwd(sinkPort), fwd(echoPort))
		})
	}

	// The raw quic-go relay between C and T (ip_bench_rawquic_test.go): what
	// quic-go alone gives the same TCP transfers and echoes, the floor of `tp
	// forward` over QUIC and of `tp ip` over HTTP/3.
	b.Run("raw-quic-go", func(b *testing.B) {
		files := newRawQUICFiles(b)
		relay := func(port string) string { return startRawQUICRelay(b, n, files, "10.201.2.2:"+port) }
		measure(b, relay(bulkPort), relay(sinkPort), relay(echoPort))
	})
}

func serveEach(ln net.Listener, f func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() { defer c.Close(); f(c) }()
	}
}

// runTPIP starts `tp ip` for a benchmark and returns the function that stops it.
func runTPIP(b *testing.B, ns string, env []string, transport string, extra ...string) (stop func()) {
	b.Helper()
	b.StopTimer()
	defer b.StartTimer()
	// Registered before startTPIP's own cleanup, so it runs after `tp ip`
	// ended and logged its drop counts.
	var log interface{ String() string }
	b.Cleanup(func() {
		for _, line := range strings.Split(log.String(), "\n") {
			if strings.Contains(line, "datagrams_dropped") {
				b.Logf("tp ip --transport %s %s: %s", transport, strings.Join(extra, " "), line)
			}
		}
	})
	log = startTPIP(b, ns, env, append([]string{"--transport", transport}, extra...)...)
	return func() {}
}

// startForwardIn runs `tp forward 127.0.0.1:0 target` in ns and returns the
// local address it listens on.
func startForwardIn(b *testing.B, ns string, env []string, transport, target string) string {
	b.Helper()
	cmd := command("ip", "netns", "exec", ns, binary("tp"), "forward", "--transport", transport, "127.0.0.1:0", target)
	cmd.Env = append(os.Environ(), env...)
	return startListening(b, cmd, "tp forward "+target, regexp.MustCompile(`^Forwarding (\S+) to`))
}

// startListening starts cmd, which runs until the benchmark ends, and returns
// the address the first of its output lines (stdout and stderr) that matches
// re names. Its output is logged when the benchmark fails.
func startListening(b *testing.B, cmd *exec.Cmd, what string, re *regexp.Regexp) string {
	b.Helper()
	out, w := io.Pipe()
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); w.Close(); close(exited) }() // the output ends with the process
	b.Cleanup(func() { _ = cmd.Process.Signal(syscall.SIGTERM); <-exited })
	addr := make(chan string, 1)
	log := &testlog.Buffer{}
	go func() {
		defer close(addr)
		sent := false
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			fmt.Fprintln(log, sc.Text())
			if m := re.FindStringSubmatch(sc.Text()); m != nil && !sent {
				addr <- m[1]
				sent = true
			}
		}
	}()
	b.Cleanup(func() {
		if b.Failed() {
			b.Logf("%s:\n%s", what, log.String())
		}
	})
	select {
	case a, ok := <-addr:
		if !ok {
			b.Fatalf("%s exited before it listened:\n%s", what, log.String())
		}
		return a
	case <-time.After(60 * time.Second):
		b.Fatalf("%s did not listen within 60s", what)
	}
	return ""
}
