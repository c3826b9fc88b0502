package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Scenarios in the order they run. Names are what --only takes.
var Scenarios = []string{"bulk", "download", "setup", "handshake", "memory", "reverse", "loss", "policy", "load", "slowloris", "soak", "concurrency", "http", "connect", "ip"}

// peerScenarios measure the peers (Peers) beside TP.
var peerScenarios = []string{"bulk", "download", "setup", "memory", "reverse", "ip"}

// Options select what a run measures.
type Options struct {
	Quick    bool          // smaller sizes and fewer runs, for a smoke run under 2 minutes
	Runs     int           // runs per variant; 0 means 5 (3 with Quick)
	Only     []string      // scenario names; empty means all
	JSON     string        // also write the rows to this file
	Markdown bool          // print the table as Markdown
	Soak     time.Duration // length of the soak scenario; 0 means 10m (20s with Quick)
	Compare  string        // a directory with older tp, dlogin and tpd: sizes and fresh tp measured beside this tree's
	Peers    Peers         // ghostunnel, chisel, frps and frpc, measured beside TP when given
	Command  string        // the command line, recorded in the JSON report
	Stdout   io.Writer
	Stderr   io.Writer // progress lines
}

// sizes are the per-scenario workloads.
type sizes struct {
	bulkBytes     int64
	setupConns    int // sequential connections on a long-running tp forward
	setupProcs    int // fresh tp / ssh -W processes
	handshakeTime time.Duration
	tunnels       int // idle tunnels per batch
	ipOps         int // 16 MiB transfers per path, direction and run (ip)
	policyEvals   int
	httpTime      time.Duration // load per variant and run in the http scenario
	httpSeq       int           // sequential requests of one client per variant and run (http)
	stress        stressSizes   // scenarios 8–10 (load.go)
}

func (o Options) sizes() sizes {
	if o.Quick {
		return sizes{bulkBytes: 64 << 20, setupConns: 50, setupProcs: 5, handshakeTime: 500 * time.Millisecond, tunnels: 200, ipOps: 3, policyEvals: 2000, httpTime: 300 * time.Millisecond, httpSeq: 30,
			stress: quickStress(o.Soak)}
	}
	return sizes{bulkBytes: 1 << 30, setupConns: 200, setupProcs: 20, handshakeTime: 2 * time.Second, tunnels: 1000, ipOps: 10, policyEvals: 20000, httpTime: 5 * time.Second, httpSeq: 500,
		stress: fullStress(o.Soak)}
}

func (o Options) runs() int {
	switch {
	case o.Runs > 0:
		return o.Runs
	case o.Quick:
		return 3
	default:
		return 5
	}
}

func (o Options) wants(s string) bool { return len(o.Only) == 0 || slices.Contains(o.Only, s) }

// Run builds and starts everything the selected scenarios need, measures them,
// stops every process it started (also on error) and prints one table.
func Run(ctx context.Context, o Options) (err error) {
	for _, s := range o.Only {
		if !slices.Contains(Scenarios, s) {
			return fmt.Errorf("unknown scenario %q; choose from %s", s, strings.Join(Scenarios, ", "))
		}
	}
	if o.Stderr == nil {
		o.Stderr = io.Discard
	}
	if o.Compare != "" {
		for _, b := range []string{"tp", "dlogin", "tpd"} {
			if fi, err := os.Stat(filepath.Join(o.Compare, b)); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
				return fmt.Errorf("--compare %s must hold executables tp, dlogin and tpd (build them with: git worktree add /tmp/old COMMIT && cd /tmp/old && go build -o %s ./cmd/tp ./cmd/dlogin ./cmd/tpd)", o.Compare, o.Compare)
			}
		}
	}
	peers, err := resolvePeers(o.Peers, os.Stat)
	if err != nil {
		return err
	}
	start := time.Now()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "tpbench-")
	if err != nil {
		return err
	}
	e := &Env{dir: dir, self: self, compare: o.Compare, peers: peers, log: func(f string, a ...any) {
		fmt.Fprintf(o.Stderr, "[%6.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(f, a...))
	}}
	defer e.Close()

	needTP := slices.ContainsFunc(Scenarios, func(s string) bool { return s != "policy" && o.wants(s) })
	if needTP {
		if o.wants("reverse") || o.wants("http") {
			e.reverse = true
			if e.publicPorts, err = freePorts(4); err != nil {
				return err
			}
		}
		if err := e.build(ctx); err != nil {
			return err
		}
		// Scenarios 8–10 run against a tpd of their own (stress.go).
		if slices.ContainsFunc(Scenarios, func(s string) bool { return !stressScenario(s) && s != "policy" && o.wants(s) }) {
			if err := e.startTPD(ctx); err != nil {
				return err
			}
			e.quic = e.hasTransportFlag(ctx, "forward")
			e.quicStdio = e.hasTransportFlag(ctx)
			if !e.quic {
				e.log("tp forward has no --transport flag yet: QUIC variants left out")
			}
		}
		sink, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		e.onClose(serve(sink, sinkHandler))
		echo, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		e.onClose(serve(echo, echoHandler))
		csink, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		e.onClose(serve(csink, countedSinkHandler))
		source, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		e.onClose(serve(source, sourceHandler))
		e.source = source.Addr().String()
		e.sink, e.echo, e.csink = sink.Addr().String(), echo.Addr().String(), csink.Addr().String()
		if slices.ContainsFunc(peerScenarios, o.wants) {
			e.probeVersions(ctx)
		}
	}

	sz, runs := o.sizes(), o.runs()
	var rows []Row
	steps := []struct {
		name string
		fn   func(context.Context, *Env, sizes, int) ([]Row, error)
	}{
		{"bulk", bulk}, {"download", download}, {"setup", setup}, {"handshake", handshakes}, {"memory", memory}, {"reverse", reverse}, {"loss", loss}, {"policy", policyLatency},
		{"load", loadScenario}, {"slowloris", slowloris}, {"soak", soak}, {"concurrency", concurrency},
		{"http", httpScenario}, {"connect", connectBulk}, {"ip", ipScenario},
	}
	for _, s := range steps {
		if !o.wants(s.name) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("before scenario %s: %w", s.name, err) // interrupted: the deferred Close stops everything
		}
		if err := e.tpdExited(); err != nil {
			return fmt.Errorf("before scenario %s: %w", s.name, err)
		}
		e.log("scenario %s (%s)", s.name, loadavg())
		r, err := s.fn(ctx, e, sz, runs)
		if err != nil {
			return fmt.Errorf("scenario %s: %w", s.name, err)
		}
		rows = append(rows, r...)
	}
	for i := range rows {
		rows[i].summarise()
	}
	fillRatios(rows)
	e.log("done")
	if err := WriteTable(o.Stdout, rows, o.Markdown); err != nil {
		return err
	}
	if o.JSON != "" {
		return writeJSON(o.JSON, Report{
			Date: time.Now().UTC().Format(time.RFC3339), Machine: Machine(),
			Command: o.Command, Quick: o.Quick, Peers: e.peerReport(), Rows: rows,
		})
	}
	return nil
}

// Machine describes this machine: cores and CPU model.
func Machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	return fmt.Sprintf("%d cores, %s, %s/%s, %s", runtime.NumCPU(), model, runtime.GOOS, runtime.GOARCH, runtime.Version())
}

// measure runs fn runs times, collecting one value per run into row. An error
// is recorded in the row instead of aborting the whole suite.
func measure(row *Row, runs int, fn func() (float64, error)) {
	for range runs {
		v, err := fn()
		if err != nil {
			row.Err = firstLine(err.Error())
			row.Runs = nil
			return
		}
		row.Runs = append(row.Runs, v)
	}
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 120 {
		s = s[:120] + "…"
	}
	return s
}
