package bench

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/tp-proxy/tp/clients"
)

// Scenario 10: a mixed workload for the soak duration — idle tunnels held open
// (a tenth of them replaced at every sample), checksummed transfers over TLS and
// QUIC, and the canary — while tpd's goroutines, open fds, RSS and live heap are
// sampled. Flat means: no slope after the first minutes.
func soak(ctx context.Context, e *Env, sz sizes, _ int) ([]Row, error) {
	const scn = "10 soak"
	st := sz.stress
	s, err := e.stressSetup(ctx, st)
	if err != nil {
		return nil, err
	}
	_, failedBefore, err := s.decisions()
	if err != nil {
		return nil, err
	}
	tlsD, err := s.dialer(clients.TransportTLS)
	if err != nil {
		return nil, err
	}
	quicD, err := s.dialer(clients.TransportQUIC)
	if err != nil {
		return nil, err
	}
	defer quicD.Close()
	canaryD, err := s.dialer(clients.TransportTLS)
	if err != nil {
		return nil, err
	}
	startLoad := loadavg()
	sctx, stop := context.WithTimeout(ctx, st.soak)
	defer stop()

	idle := openIdle(sctx, tlsD, e.echo, st.soakIdle, 16)
	held := idle.conns
	defer func() { closeAll(held) }()
	churned, churnFailed, churnPolicy := 0, idle.failed, idle.policyErrs
	churnErr := idle.firstErr

	var t tally
	// Worker 0 uses QUIC, the others TLS: both carriers stay in the mix.
	wait := activeWorkers(sctx, st.soakActive, func(w int) *clients.Dialer {
		if w == 0 {
			return quicD
		}
		return tlsD
	}, e.ck, st.transferBytes, st.rate, &t)
	canaryDone := make(chan canaryResult, 1)
	go func() { canaryDone <- canary(sctx, canaryD, e.echo, 0, canaryEvery) }()

	var rss, fds, gor, heap, threads series
	began := time.Now()
	tick := time.NewTicker(st.sampleEvery)
	defer tick.Stop()
	e.log("  soak for %s: %d idle tunnels, %d checksummed transfers at once (one over QUIC), canary every %s; sample every %s",
		st.soak, len(held), st.soakActive, canaryEvery, st.sampleEvery)
	sampleErr := error(nil)
	for sctx.Err() == nil {
		select {
		case <-sctx.Done():
			continue
		case <-tick.C:
		}
		u, err := s.usage()
		if err != nil {
			sampleErr = err
			break
		}
		at := time.Since(began).Seconds()
		add := func(sr *series, v float64) {
			if !math.IsNaN(v) {
				*sr = append(*sr, sample{at, v})
			}
		}
		add(&rss, u.rssMiB)
		add(&fds, u.fds)
		add(&gor, u.goroutines)
		add(&heap, u.heapMB)
		add(&threads, u.threads)
		e.log("  %5.0fs %s; %d transfers ok, %d mismatches, %d errors", at, u,
			t.transfers.Load(), t.upMismatch.Load()+t.downMismatch.Load(), t.errs.Load())
		// Replace a tenth of the idle tunnels: sessions end and begin all along.
		k := len(held) / 10
		closeAll(held[:k])
		held = held[k:]
		fresh := openIdle(sctx, tlsD, e.echo, k, 16)
		held = append(held, fresh.conns...)
		churned += k
		if sctx.Err() == nil { // dials cut by the soak's end are not failures
			churnFailed += fresh.failed
			churnPolicy += fresh.policyErrs
			if churnErr == nil {
				churnErr = fresh.firstErr
			}
		}
	}
	stop() // also when a sample failed
	wait()
	can := <-canaryDone
	if sampleErr != nil {
		return nil, sampleErr
	}
	_, failedAfter, err := s.decisions()
	if err != nil {
		return nil, err
	}
	e.log("  soak done: %s; canary p50 %.2f ms, p99 %.2f ms, %d failed", &t, can.p(50), can.p(99), can.failed)

	note := fmt.Sprintf("%s of %d idle tunnels (%d replaced), %d transfers at once of %d MiB each way at %d KiB/s, canary every %s; sampled every %s; %s at the start, %s at the end",
		st.soak, st.soakIdle, churned, st.soakActive, st.transferBytes>>20, st.rate>>10, canaryEvery, st.sampleEvery, startLoad, loadavg())
	gauge := func(what, unit string, sr series) Row {
		r := Row{Scenario: scn, Variant: "tpd " + what, Transport: "tls+quic", Unit: unit, Runs: sr.values(), Note: sr.summary()}
		if len(sr) == 0 {
			r.Err = "no samples"
		}
		return r
	}
	count := func(what, unit string, v int64, target, note string) Row {
		return Row{Scenario: scn, Variant: what, Transport: "tls+quic", Unit: unit, Runs: []float64{float64(v)}, Target: target, Note: note}
	}
	rows := []Row{
		gauge("goroutines", "goroutines", gor), gauge("open fds", "fds", fds), gauge("RSS", "MiB", rss),
		gauge("live heap", "MB", heap), gauge("threads", "threads", threads),
		count("checksummed transfers, matched both ways", "transfers", t.transfers.Load(), "", note),
		count("checksum mismatches", "transfers", t.upMismatch.Load()+t.downMismatch.Load(), "0", ""),
		count("transfer errors", "transfers", t.errs.Load(), "0", fmt.Sprint(t.firstErr)),
		count("idle tunnels that failed to open", "tunnels", int64(churnFailed), "0", errNote(churnErr)),
		count("canary failures", "requests", int64(can.failed), "0", errNote(can.firstErr)),
		count("policy_error denials (clients)", "requests", t.policyErrs.Load()+int64(can.policyErrs+churnPolicy), "0", ""),
		count("policy_error denials (decision log)", "decisions", int64(failedAfter-failedBefore), "0", ""),
	}
	kept := can.without(s.trace.dumpWindows())
	for _, q := range []float64{50, 99} {
		r := Row{Scenario: scn, Variant: fmt.Sprintf("canary round trip over the soak, p%.0f", q), Transport: "tls", Unit: "ms"}
		if len(kept.ms) > 0 {
			r.Runs = []float64{kept.p(q)}
		} else {
			r.Err = "no canary succeeded"
		}
		if q == 99 {
			r.Note = dumpNote(can, kept)
		}
		rows = append(rows, r)
	}
	return rows, nil
}
