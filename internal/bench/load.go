package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/tp-proxy/tp/clients"
)

// stressSizes are the workloads of scenarios 8–10.
type stressSizes struct {
	handshakeTimeout time.Duration // tpd's handshake-timeout: what slowloris sockets get
	sampleEvery      time.Duration // resource samples and the runtime's scheduler dumps
	canaries         int           // canary round trips per phase, one per canaryEvery
	idle             int           // idle tunnels held during the load
	active           int           // checksummed transfers running at once
	transferBytes    int64         // each way, per transfer
	rate             int64         // bytes per second each way, per active tunnel
	slowSockets      int           // held at once
	attack           time.Duration // how long slowloris sockets are held
	soak             time.Duration
	soakIdle         int // idle tunnels held during the soak, a tenth replaced per sample
	soakActive       int
}

const (
	canaryEvery = 100 * time.Millisecond
	// perSource stays under tpd's max-handshakes-per-ip (128) so that the
	// slowloris sockets meet the handshake timeout, not that bound.
	perSource = 100
	// burst is how many idle tunnels scenario 8 opens at once.
	burst = 100
)

func quickStress(soak time.Duration) stressSizes {
	if soak == 0 {
		soak = 20 * time.Second
	}
	return stressSizes{handshakeTimeout: 2 * time.Second, sampleEvery: 2 * time.Second, canaries: 30,
		idle: 100, active: 2, transferBytes: 1 << 20, rate: 4 << 20, slowSockets: 60, attack: 4 * time.Second,
		soak: soak, soakIdle: 20, soakActive: 2}
}

func fullStress(soak time.Duration) stressSizes {
	if soak == 0 {
		soak = 10 * time.Minute
	}
	return stressSizes{handshakeTimeout: 5 * time.Second, sampleEvery: 10 * time.Second, canaries: 600,
		idle: 2000, active: 16, transferBytes: 8 << 20, rate: 1 << 20, slowSockets: 500, attack: time.Minute,
		soak: soak, soakIdle: 500, soakActive: 4}
}

func stressScenario(s string) bool { return s == "load" || s == "slowloris" || s == "soak" }

// stress starts (once) the stress tpd and the checksum server.
func (e *Env) stressSetup(ctx context.Context, sz stressSizes) (*stressTPD, error) {
	if e.stress != nil {
		return e.stress, nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	e.onClose(serve(ln, ckHandler))
	e.ck = ln.Addr().String()
	return e.startStressTPD(ctx, sz.handshakeTimeout, sz.sampleEvery)
}

// loadavg is the machine's 1-, 5- and 15-minute load averages, for the notes:
// the machine is shared, and the figures depend on what else ran.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "load average unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "load average unknown"
	}
	return "load average " + strings.Join(f[:3], " ")
}

// Scenario 8: a canary request (a new tunnel, one byte echoed) every 100 ms,
// first with nothing else running, then while N idle tunnels are held open and M
// tunnels move checksummed data both ways; tpd's resources under that load;
// checksum mismatches and policy_error denials, both of which must be 0.
func loadScenario(ctx context.Context, e *Env, sz sizes, _ int) ([]Row, error) {
	const scn = "8 load"
	st := sz.stress
	s, err := e.stressSetup(ctx, st)
	if err != nil {
		return nil, err
	}
	canaryD, err := s.dialer(clients.TransportTLS)
	if err != nil {
		return nil, err
	}
	if _, err := roundTripVia(ctx, canaryD, e.echo); err != nil { // warm: session ticket, code paths
		return nil, fmt.Errorf("first canary: %w", err)
	}
	before, _, err := s.decisions()
	if err != nil {
		return nil, err
	}
	startLoad := loadavg()
	e.log("  canary without load: %d round trips, one per %s (%s)", st.canaries, canaryEvery, startLoad)
	base := canary(ctx, canaryD, e.echo, st.canaries, canaryEvery)
	e.log("  canary without load: p50 %.2f ms, p99 %.2f ms, %d failed", base.p(50), base.p(99), base.failed)
	quiet, err := s.usage()
	if err != nil {
		return nil, err
	}

	idleD, err := s.dialer(clients.TransportTLS)
	if err != nil {
		return nil, err
	}
	opened := time.Now()
	// Opened in a burst, as many at once as tpd lets one address handshake, less
	// a margin: the policy decisions queue for the CPU.
	idle := openIdle(ctx, idleD, e.echo, st.idle, burst)
	openTook := time.Since(opened)
	defer closeAll(idle.conns)
	e.log("  %d idle tunnels open in %s, %d at once, %d failed %v", len(idle.conns), openTook.Round(time.Millisecond), burst, idle.failed, idle.firstErr)

	actx, stopActive := context.WithCancel(ctx)
	var t tally
	activeD, err := s.dialer(clients.TransportTLS)
	if err != nil {
		stopActive()
		return nil, err
	}
	wait := activeWorkers(actx, st.active, func(int) *clients.Dialer { return activeD }, e.ck, st.transferBytes, st.rate, &t)
	e.log("  canary under load: %d idle + %d active tunnels", len(idle.conns), st.active)
	loaded := canary(ctx, canaryD, e.echo, st.canaries, canaryEvery)
	busy, uerr := s.usage()
	stopActive()
	wait()
	endLoad := loadavg()
	e.log("  canary under load: p50 %.2f ms, p99 %.2f ms, %d failed %v (all samples, also those during scheduler dumps)", loaded.p(50), loaded.p(99), loaded.failed, loaded.firstErr)
	e.log("  active: %s", &t)
	e.log("  tpd quiet: %s; loaded: %s; scheduler dump took %s", quiet, busy, s.trace.dumpDuration())
	if uerr != nil {
		return nil, uerr
	}
	after, failedEvals, err := s.decisions()
	if err != nil {
		return nil, err
	}

	loadLabel := fmt.Sprintf("%d idle + %d active tunnels", len(idle.conns), st.active)
	windows := s.trace.dumpWindows()
	canaryRows := func(label string, all canaryResult, baseline string) []Row {
		var rows []Row
		c := all.without(windows)
		for _, q := range []float64{50, 99} {
			r := Row{Scenario: scn, Variant: fmt.Sprintf("canary round trip, %s, p%.0f", label, q), Transport: "tls", Unit: "ms"}
			if len(c.ms) == 0 {
				r.Err = "no canary succeeded"
			} else {
				r.Runs = []float64{c.p(q)}
			}
			if q == 99 {
				r.Note = dumpNote(all, c)
			}
			if baseline != "" {
				r.Baseline = fmt.Sprintf("canary round trip, %s, p%.0f", baseline, q)
			}
			rows = append(rows, r)
		}
		return rows
	}
	count := func(what, unit string, v int64, target, note string) Row {
		return Row{Scenario: scn, Variant: what, Transport: "tls", Unit: unit, Runs: []float64{float64(v)}, Target: target, Note: note}
	}
	rows := canaryRows("no load", base, "")
	rows = append(rows, canaryRows(loadLabel, loaded, "no load")...)
	rows[0].Note = fmt.Sprintf("%d canaries per phase, one per %s; %s at the start, %s at the end", st.canaries, canaryEvery, startLoad, endLoad)
	rows = append(rows,
		count("canary failures", "requests", int64(base.failed+loaded.failed), "0", errNote(base.firstErr, loaded.firstErr)),
		count("idle tunnels that failed to open", "tunnels", int64(idle.failed), "0",
			fmt.Sprintf("%d opened %d at once in %s. %s", len(idle.conns), burst, openTook.Round(time.Millisecond), errNote(idle.firstErr))),
		count("checksummed transfers, matched both ways", "transfers", t.transfers.Load(), "",
			fmt.Sprintf("%d MiB each way per transfer, %d at once, paced at %d KiB/s each way", st.transferBytes>>20, st.active, st.rate>>10)),
		count("checksum mismatches", "transfers", t.upMismatch.Load()+t.downMismatch.Load(), "0", ""),
		count("transfer errors", "transfers", t.errs.Load(), "0", strings.Join(t.firstErr, "; ")),
		count("policy_error denials (clients)", "requests", t.policyErrs.Load()+int64(base.policyErrs+loaded.policyErrs+idle.policyErrs), "0", ""),
		count("policy_error denials (decision log)", "decisions", int64(failedEvals), "0",
			fmt.Sprintf("of %d decisions in the run so far (%d before this scenario)", after, before)),
	)
	rows = append(rows, usageRows(scn, "no tunnels", quiet)...)
	rows = append(rows, usageRows(scn, loadLabel, busy)...)
	return rows, nil
}

// dumpNote says how many canaries were left out as taken during a scheduler
// dump, and what p99 was with them.
func dumpNote(all, c canaryResult) string {
	return fmt.Sprintf("%d of %d taken during the runtime's scheduler dumps left out; with them p99 %s ms",
		c.excluded, len(all.ms), fmtNum(all.p(99)))
}

func errNote(errs ...error) string {
	for _, err := range errs {
		if err != nil {
			return "first: " + firstLine(err.Error())
		}
	}
	return ""
}
