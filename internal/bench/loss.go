package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Scenario 6: goodput and small-request latency under packet loss. tpbench
// creates its own network namespace (tpbench-PID), drops a share of the packets
// on the namespace's loopback with iptables' statistic match (only those to and
// from tpd's port, or the server's for direct TCP), and runs a second
// tpd, `tp forward` and a loss server (helper role "loss-server": the first byte
// selects sink or echo) inside it. Each trial is a helper process in the
// namespace ("loss-client") that streams to the sink for a fixed time while it
// sends 1-byte requests to the echo side every 10 ms on a second connection
// through the same forwarder, and prints goodput and the requests' p99. The
// namespace is deleted when the scenario ends.

var lossLevels = []float64{0, 0.01, 0.03}

const (
	lossModeBulk = 'B'
	lossModeEcho = 'E'
)

// lossServerHandler reads the mode byte, then acts as the sink or the echo server.
func lossServerHandler(c net.Conn) {
	var m [1]byte
	if _, err := io.ReadFull(c, m[:]); err != nil {
		return
	}
	switch m[0] {
	case lossModeBulk:
		sinkHandler(c)
	case lossModeEcho:
		echoHandler(c)
	}
}

// runLossHelper runs the helper roles of this scenario (see RunHelper).
func runLossHelper(ctx context.Context, role string, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet(role, flag.ContinueOnError)
	addr := fs.String("addr", "", "loss-client: the loss server (or a forwarder in front of it)")
	dur := fs.Duration("duration", 2*time.Second, "loss-client: how long to stream")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if role == "loss-client" {
		return lossClient(*addr, *dur, stdout)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "ADDR %s\n", ln.Addr())
	stop := serve(ln, lossServerHandler)
	<-ctx.Done()
	stop()
	return nil
}

// lossClient streams to the sink for dur and meanwhile sends 1-byte requests on
// a second connection; it prints "RESULT goodput-MB/s p99-ms requests".
func lossClient(addr string, dur time.Duration, stdout io.Writer) error {
	open := func(mode byte) (net.Conn, error) {
		c, err := net.DialTimeout("tcp", addr, 30*time.Second)
		if err != nil {
			return nil, err
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Write([]byte{mode}); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
	ec, err := open(lossModeEcho)
	if err != nil {
		return err
	}
	defer ec.Close()
	var b [1]byte
	if _, err := ec.Write([]byte{'x'}); err != nil {
		return err
	}
	if _, err := io.ReadFull(ec, b[:]); err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	bc, err := open(lossModeBulk)
	if err != nil {
		return err
	}
	defer bc.Close()
	if _, err := io.ReadFull(bc, b[:]); err != nil || b[0] != sinkReady {
		return fmt.Errorf("sink did not come up: %v", err)
	}
	bc.SetDeadline(time.Now().Add(dur + 2*time.Minute))

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var lat []float64
	var reqErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			ec.SetDeadline(time.Now().Add(time.Minute))
			t0 := time.Now()
			if _, err := ec.Write([]byte{'x'}); err != nil {
				reqErr = err
				return
			}
			if _, err := io.ReadFull(ec, b[:]); err != nil {
				reqErr = err
				return
			}
			lat = append(lat, float64(time.Since(t0))/float64(time.Millisecond))
		}
	}()
	buf := make([]byte, 64<<10)
	start := time.Now()
	var werr error
	for time.Since(start) < dur {
		if _, werr = bc.Write(buf); werr != nil {
			break
		}
	}
	if werr == nil {
		werr = bc.(*net.TCPConn).CloseWrite()
	}
	var ack [8]byte
	if werr == nil {
		_, werr = io.ReadFull(bc, ack[:])
	}
	elapsed := time.Since(start)
	close(stop)
	wg.Wait()
	if err := errors.Join(werr, reqErr); err != nil {
		return err
	}
	if len(lat) == 0 {
		return errors.New("no request completed during the stream")
	}
	slices.Sort(lat)
	fmt.Fprintf(stdout, "RESULT %g %g %d\n", float64(binary.BigEndian.Uint64(ack[:]))/1e6/elapsed.Seconds(), percentile(lat, 99), len(lat))
	return nil
}

var resultRe = regexp.MustCompile(`(?m)^RESULT (\S+) (\S+) (\d+)$`)

// netns is the scenario's own network namespace.
type netns struct{ name string }

func (n netns) wrap(name string, args ...string) []string {
	return append([]string{"netns", "exec", n.name, name}, args...)
}

func (n netns) run(ctx context.Context, env []string, name string, args ...string) (string, error) {
	return runCmd(ctx, 3*time.Minute, env, "ip", n.wrap(name, args...)...)
}

// setLoss replaces the namespace's INPUT rules with ones dropping share p of the
// TCP and UDP packets to and from port on lo: only the leg that models the
// network (device → tpd for TP, client → server for direct TCP) loses packets.
func (n netns) setLoss(ctx context.Context, p float64, port int) error {
	if _, err := n.run(ctx, nil, "iptables", "-F", "INPUT"); err != nil {
		return err
	}
	if p == 0 {
		return nil
	}
	for _, proto := range []string{"tcp", "udp"} {
		for _, dir := range []string{"--dport", "--sport"} {
			if _, err := n.run(ctx, nil, "iptables", "-A", "INPUT", "-i", "lo", "-p", proto, dir, strconv.Itoa(port),
				"-m", "statistic", "--mode", "random", "--probability", strconv.FormatFloat(p, 'f', -1, 64), "-j", "DROP"); err != nil {
				return err
			}
		}
	}
	return nil
}

func loss(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "6 loss"
	skipped := func(why string) ([]Row, error) {
		e.log("loss: skipped: %s", why)
		return []Row{{Scenario: scn, Variant: "all variants", Transport: "-", Unit: "-", Err: "skipped: needs root and iptables (" + why + ")"}}, nil
	}
	if os.Geteuid() != 0 {
		return skipped("not root")
	}
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			return skipped(tool + " not found")
		}
	}
	ns := netns{name: fmt.Sprintf("tpbench-%d", os.Getpid())}
	if _, err := runCmd(ctx, 30*time.Second, nil, "ip", "netns", "add", ns.name); err != nil {
		return skipped("ip netns add: " + firstLine(err.Error()))
	}
	var procs []*proc
	defer func() {
		for i := len(procs) - 1; i >= 0; i-- {
			procs[i].stop()
		}
		if _, err := runCmd(context.Background(), 30*time.Second, nil, "ip", "netns", "del", ns.name); err != nil {
			e.log("loss: %v", err)
		}
	}()
	if _, err := runCmd(ctx, 30*time.Second, nil, "ip", "-n", ns.name, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	if err := ns.setLoss(ctx, 0, 0); err != nil {
		return skipped("iptables in the namespace: " + firstLine(err.Error()))
	}

	// tpd, the enrolled device, the loss server and the forwarders, all inside ns.
	data := filepath.Join(e.dir, "tpdata-loss")
	home := filepath.Join(e.dir, "tp-home-loss")
	if _, err := runCmd(ctx, time.Minute, nil, e.binary("tpd"), "init", "--data-dir", data); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(data, "policy", "tp.rego"), []byte(benchPolicy), 0o600); err != nil {
		return nil, err
	}
	listening := regexp.MustCompile(`listening on (\S+) \(`)
	var tpdAddr string
	tpd, err := e.startProc(ctx, "tpd (loss namespace)", command("ip", ns.wrap(e.binary("tpd"), "serve", "--data-dir", data, "--listen", "127.0.0.1:0"), nil),
		false, time.Minute, func(line string) bool {
			if m := listening.FindStringSubmatch(line); m != nil {
				tpdAddr = m[1]
			}
			return strings.HasPrefix(line, "CA fingerprint: ")
		})
	if err != nil {
		return nil, err
	}
	procs = append(procs, tpd)
	out, err := runCmd(ctx, time.Minute, nil, e.binary("tpd"), "enroll", "bench", "--device", "loss", "--groups", "bench", "--data-dir", data)
	if err != nil {
		return nil, err
	}
	var dl []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "dlogin ") {
			dl = strings.Fields(line)[1:]
		}
	}
	if dl == nil {
		return nil, fmt.Errorf("tpd enroll printed no dlogin line:\n%s", out)
	}
	if out, err := ns.run(ctx, []string{"TP_HOME=" + home}, e.binary("dlogin"), dl...); err != nil {
		return nil, err
	} else if !strings.Contains(out, "Login successful!") {
		return nil, fmt.Errorf("dlogin did not report success:\n%s", out)
	}
	var server string
	srv, err := e.startProc(ctx, "loss server", command("ip", ns.wrap(e.self, helperArg, "loss-server"), nil), false, 30*time.Second, func(line string) bool {
		if m := addrRe.FindStringSubmatch(line); m != nil {
			server = m[1]
			return true
		}
		return false
	})
	if err != nil {
		return nil, err
	}
	procs = append(procs, srv)

	type path struct {
		name, transport, addr string
		lossPort              int // the port whose packets are dropped
	}
	paths := []path{{"direct TCP", "tcp", server, atoi(portOf(server))}}
	transports := []string{"tls"}
	if e.quic {
		transports = append(transports, "quic")
	}
	for _, t := range transports {
		var addr string
		p, err := e.startProc(ctx, "tp forward (loss namespace)", command("ip", ns.wrap(e.binary("tp"), "forward", "--transport", t, "127.0.0.1:0", server), []string{"TP_HOME=" + home}),
			true, time.Minute, func(line string) bool {
				if m := forwardRe.FindStringSubmatch(line); m != nil {
					addr = m[1]
					return true
				}
				return false
			})
		if err != nil {
			return nil, err
		}
		procs = append(procs, p)
		paths = append(paths, path{"TP over " + strings.ToUpper(t) + " (tp forward)", t, addr, atoi(portOf(tpdAddr))})
	}

	dur := 3 * time.Second
	if sz.bulkBytes < 1<<30 { // --quick
		dur = time.Second
	}
	trial := func(addr string) ([]float64, error) {
		out, err := ns.run(ctx, nil, e.self, helperArg, "loss-client", "-addr", addr, "-duration", dur.String())
		if err != nil {
			return nil, err
		}
		m := resultRe.FindStringSubmatch(out)
		if m == nil {
			return nil, fmt.Errorf("loss-client printed no result: %s", firstLine(out))
		}
		g, _ := strconv.ParseFloat(m[1], 64)
		p99, _ := strconv.ParseFloat(m[2], 64)
		return []float64{g, p99}, nil
	}
	// Warm each forwarder (its connection to tpd) without loss.
	for _, p := range paths {
		if _, err := trial(p.addr); err != nil {
			e.log("loss: warm-up %s: %v", p.name, err)
		}
	}
	var vs []*variant
	for _, level := range lossLevels {
		e.log("loss: %g%% of the packets of the device's (client's) connection dropped", level*100)
		var lvs []*variant
		for _, p := range paths {
			name := func(l float64, what string) string { return fmt.Sprintf("%s, %g%% loss, %s", p.name, l*100, what) }
			g := &Row{Scenario: scn, Variant: name(level, "goodput"), Transport: p.transport, Unit: "MB/s"}
			r := &Row{Scenario: scn, Variant: name(level, "1-byte request p99 beside it"), Transport: p.transport, Unit: "ms"}
			if level != 0 {
				g.Baseline, r.Baseline = name(0, "goodput"), name(0, "1-byte request p99 beside it")
			}
			lvs = append(lvs, &variant{rows: []*Row{g, r}, fn: func() ([]float64, error) {
				if err := ns.setLoss(ctx, level, p.lossPort); err != nil {
					return nil, err
				}
				return trial(p.addr)
			}})
		}
		e.interleave(runs, lvs)
		vs = append(vs, lvs...)
	}
	return collect(vs), nil
}
