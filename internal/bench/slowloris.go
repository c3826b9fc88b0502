package bench

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/proxy/wire"
)

// clientHelloRecord is the first TLS record a client sends tpd: a real
// ClientHello (ALPN tp/1), captured from crypto/tls over a pipe.
func clientHelloRecord() ([]byte, error) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go tls.Client(a, &tls.Config{ServerName: "127.0.0.1", NextProtos: []string{wire.ALPN}, MinVersion: tls.VersionTLS13}).Handshake()
	b.SetReadDeadline(time.Now().Add(10 * time.Second))
	var hdr [5]byte
	if _, err := io.ReadFull(b, hdr[:]); err != nil {
		return nil, fmt.Errorf("capture a ClientHello: %w", err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:]))
	if _, err := io.ReadFull(b, body); err != nil {
		return nil, fmt.Errorf("capture a ClientHello: %w", err)
	}
	return append(hdr[:], body...), nil
}

// slowResult is one slowloris socket: how long after connecting tpd closed it,
// or that it was still open at the scenario's bound.
type slowResult struct {
	closedAfter time.Duration
	open        bool
	err         error // could not connect
}

// slowSocket connects from src and either sends nothing (silent) or dribbles the
// ClientHello one byte per every, never its last byte, until tpd closes the
// connection or bound passes.
func slowSocket(ctx context.Context, src net.IP, dst string, hello []byte, silent bool, every, bound time.Duration) slowResult {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Timeout: 10 * time.Second}
	c, err := d.DialContext(ctx, "tcp", dst)
	if err != nil {
		return slowResult{err: err}
	}
	defer c.Close()
	start := time.Now()
	c.SetReadDeadline(start.Add(bound))
	closed := make(chan struct{})
	if !silent {
		go func() {
			t := time.NewTicker(every)
			defer t.Stop()
			for _, b := range hello[:len(hello)-1] {
				select {
				case <-closed:
					return
				case <-t.C:
				}
				if _, err := c.Write([]byte{b}); err != nil {
					return // tpd closed it; the read below sees that too
				}
			}
		}()
	}
	var buf [512]byte
	for {
		_, err := c.Read(buf[:])
		if err == nil {
			continue // an alert, at most
		}
		close(closed)
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return slowResult{open: true}
		}
		return slowResult{closedAfter: time.Since(start)}
	}
}

// Scenario 9: K sockets, from several loopback source addresses (tpd bounds
// unfinished handshakes per address), open TCP to tpd and send nothing or a
// ClientHello one byte at a time. Reported: when tpd closed them, relative to
// its handshake-timeout, and how legitimate clients fared meanwhile.
func slowloris(ctx context.Context, e *Env, sz sizes, _ int) ([]Row, error) {
	const scn = "9 slowloris"
	st := sz.stress
	s, err := e.stressSetup(ctx, st)
	if err != nil {
		return nil, err
	}
	hello, err := clientHelloRecord()
	if err != nil {
		return nil, err
	}
	legitD, err := s.dialer(clients.TransportTLS)
	if err != nil {
		return nil, err
	}
	if _, err := roundTripVia(ctx, legitD, e.echo); err != nil {
		return nil, fmt.Errorf("first legitimate request: %w", err)
	}
	n := max(10, st.canaries/6)
	startLoad := loadavg()
	base := canary(ctx, legitD, e.echo, n, canaryEvery)
	e.log("  legitimate requests without the attack: p50 %.2f ms, p99 %.2f ms, %d failed", base.p(50), base.p(99), base.failed)

	timeout := s.handshakeTimeout
	bound := 3*timeout + 10*time.Second
	every := timeout / 20
	sources := (st.slowSockets + perSource - 1) / perSource
	// K sockets are held for the attack's length: each one tpd closes is
	// replaced by a new one from the same address.
	per := make([][]slowResult, st.slowSockets)
	actx, stopLegit := context.WithCancel(ctx)
	legitDone := make(chan canaryResult, 1)
	go func() { legitDone <- canary(actx, legitD, e.echo, 0, canaryEvery) }()
	end := time.Now().Add(st.attack)
	var wg sync.WaitGroup
	for i := range st.slowSockets {
		src := net.IPv4(127, 0, 0, byte(2+i%sources))
		wg.Go(func() {
			for ctx.Err() == nil && time.Now().Before(end) {
				per[i] = append(per[i], slowSocket(ctx, src, s.addr, hello, i%2 == 0, every, bound))
			}
		})
	}
	wg.Wait()
	stopLegit()
	legit := <-legitDone
	var results []slowResult
	for _, r := range per {
		results = append(results, r...)
	}
	e.log("  legitimate requests during the attack: %d ok, %d failed %v; p50 %.2f ms, p99 %.2f ms",
		len(legit.ms), legit.failed, legit.firstErr, legit.p(50), legit.p(99))

	var ratios []float64
	var open, early, connErrs int
	var firstConnErr error
	for _, r := range results {
		switch {
		case r.err != nil:
			connErrs++
			if firstConnErr == nil {
				firstConnErr = r.err
			}
		case r.open:
			open++
		default:
			ratios = append(ratios, r.closedAfter.Seconds()/timeout.Seconds())
			if r.closedAfter < timeout*9/10 {
				early++
			}
		}
	}
	slices.Sort(ratios)
	e.log("  %d slow sockets (%d at a time for %s) from %d addresses: %d closed (close time ÷ timeout p50 %.2f, p99 %.2f, max %.2f), %d open after %s, %d closed before 0.9× timeout, %d could not connect %v",
		len(results), st.slowSockets, st.attack, sources, len(ratios), percentile(ratios, 50), percentile(ratios, 99), percentile(ratios, 100), open, bound, early, connErrs, firstConnErr)

	note := fmt.Sprintf("%d sockets at a time for %s (each one closed replaced), from %d source addresses, half silent, half dribbling a ClientHello 1 byte per %s; handshake-timeout %s; %s",
		st.slowSockets, st.attack, sources, every, timeout, startLoad)
	one := func(variant, unit string, v float64, target, note string) Row {
		return Row{Scenario: scn, Variant: variant, Transport: "tcp", Unit: unit, Runs: []float64{v}, Target: target, Note: note}
	}
	rows := []Row{one("slow sockets closed by tpd", "sockets", float64(len(ratios)), fmt.Sprintf("all %d opened", len(results)), note)}
	if len(ratios) > 0 {
		rows = append(rows,
			one("close time ÷ handshake-timeout, p50", "×", percentile(ratios, 50), "≈1", ""),
			one("close time ÷ handshake-timeout, p99", "×", percentile(ratios, 99), "", ""),
			one("close time ÷ handshake-timeout, max", "×", percentile(ratios, 100), "", ""))
	}
	rows = append(rows,
		one("slow sockets still open at "+bound.String(), "sockets", float64(open), "0", ""),
		one("slow sockets closed before 0.9× timeout", "sockets", float64(early), "0", ""),
		one("slow sockets that could not connect", "sockets", float64(connErrs), "0", errNote(firstConnErr)))
	windows := s.trace.dumpWindows()
	lat := func(label string, all canaryResult, q float64, baseline string) Row {
		r := Row{Scenario: scn, Variant: fmt.Sprintf("legitimate request, %s, p%.0f", label, q), Transport: "tls", Unit: "ms"}
		c := all.without(windows)
		if len(c.ms) == 0 {
			r.Err = "none succeeded"
		} else {
			r.Runs = []float64{c.p(q)}
		}
		if q == 99 {
			r.Note = dumpNote(all, c)
		}
		if baseline != "" {
			r.Baseline = fmt.Sprintf("legitimate request, %s, p%.0f", baseline, q)
		}
		return r
	}
	rows = append(rows,
		lat("no attack", base, 50, ""), lat("no attack", base, 99, ""),
		lat("during the attack", legit, 50, "no attack"), lat("during the attack", legit, 99, "no attack"),
		one("legitimate requests during the attack that succeeded", "%",
			100*float64(len(legit.ms))/float64(max(1, len(legit.ms)+legit.failed)), "100",
			fmt.Sprintf("%d of %d; %s", len(legit.ms), len(legit.ms)+legit.failed, errNote(legit.firstErr))),
		one("policy_error denials of legitimate requests", "requests", float64(base.policyErrs+legit.policyErrs), "0", ""),
	)
	return rows, nil
}
