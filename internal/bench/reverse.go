package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/tp-proxy/tp/internal/lib/ephemeral"
)

// Scenario 5: the reverse path. A second enrolled device (user benchrev) runs
// `tp expose` for the sink and the echo server, protected (only the bench device
// may dial NAME.rev.tp.internal, end-to-end TLS between dialer and agent) and
// public (`--public PORT`: anyone reaches tpd's PORT with plain TCP). The bench
// device dials the protected names with `tp forward 127.0.0.1:0 NAME.rev.tp.internal:PORT`;
// the forward path (`tp forward` to the sink and echo server) and direct TCP are
// measured in the same runs. Each transport (tls, quic) has its own agents and
// forwarders, so both legs of a session use it.

// freePorts returns n loopback TCP ports that were free a moment ago, for
// processes that take a port number rather than :0 (tpd's public ports, fixed
// before tpd starts; the peers' listeners). They are chosen below the kernel's
// ephemeral range when it leaves room: the thousands of connections a run opens
// take their local ports from that range, and one of them could otherwise hold
// a port between its choice here and its use.
func freePorts(n int) ([]int, error) {
	lo, hi := portsBelowEphemeral()
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	var ports []int
	for tries := 0; len(ports) < n; tries++ {
		addr := "127.0.0.1:0"
		if hi > lo && tries < 50*n {
			addr = loopback(lo + rand.IntN(hi-lo))
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			if addr == "127.0.0.1:0" {
				return nil, err
			}
			continue // taken: try another
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// portsBelowEphemeral is a range of ports under the kernel's ephemeral ones
// (ip_local_port_range), or an empty one when that cannot be read or leaves no room.
func portsBelowEphemeral() (lo, hi int) {
	first, ok := ephemeral.Start()
	if !ok || first <= 20000 {
		return 0, 0
	}
	return 20000, first
}

// startExpose runs `tp --transport T expose NAME LOCAL args…` as the agent device
// and waits for its first "Exposing" line (the registration).
func (e *Env) startExpose(ctx context.Context, transport, name, local string, args ...string) (*proc, error) {
	all := append([]string{"--transport", transport, "expose", name, local}, args...)
	return e.startProc(ctx, "tp expose "+name, command(e.binary("tp"), all, []string{"TP_HOME=" + e.agentHome}), true, time.Minute,
		func(line string) bool { return strings.HasPrefix(line, "Exposing ") })
}

// warm retries fn until it succeeds (the first session through a fresh agent or
// forwarder fetches certificates and opens connections; that is not measured).
func warm(fn func() error) error { return warmCtx(context.Background(), fn) }

// warmCtx is warm that gives up when ctx ends (an interrupted run).
func warmCtx(ctx context.Context, fn func() error) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := fn()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond): // retry pacing while the agent registers, bounded by the deadline
		}
	}
}

// revPath is one way to reach the sink and the echo server in scenario 5.
type revPath struct {
	label, transport string
	sink, echo       string // plain TCP addresses that lead there
	counted          bool   // sink leads to the counted sink (the path cannot pass a half-close)
	err              error
}

func reverse(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const bulkScn, setupScn = "5 reverse bulk", "5 reverse setup"
	if e.agentHome == "" || len(e.publicPorts) < 4 {
		return nil, fmt.Errorf("internal: the reverse scenario needs the agent device and public ports")
	}
	transports := []string{"tls"}
	if e.quic {
		transports = append(transports, "quic")
	} else {
		e.log("tp forward has no --transport flag: reverse over QUIC left out")
	}
	host := func(name string) string { return name + ".rev.tp.internal" }

	// Start everything first, then measure.
	paths := []*revPath{{label: "direct TCP", transport: "tcp", sink: e.sink, echo: e.echo}}
	type trio struct{ fwd, prot, each, pub *revPath }
	var trios []trio
	for i, t := range transports {
		up := strings.ToUpper(t)
		fwd := &revPath{label: "tp forward over " + up + " (forward path)", transport: t}
		prot := &revPath{label: "tp expose over " + up + ", protected, one carrier (dialer: tp forward)", transport: t}
		each := &revPath{label: "tp expose over " + up + ", protected, a TP session each (dialer: tp forward --no-e2e-mux)", transport: t}
		pub := &revPath{label: "tp expose over " + up + ", --public (dialer: plain TCP)", transport: t}
		trios = append(trios, trio{fwd, prot, each, pub})
		paths = append(paths, fwd, prot, each, pub)

		if fwd.sink, _, fwd.err = e.startForward(ctx, e.sink, "--transport", t); fwd.err == nil {
			fwd.echo, _, fwd.err = e.startForward(ctx, e.echo, "--transport", t)
		}

		sinkName, echoName := "bsink-"+t, "becho-"+t
		if _, prot.err = e.startExpose(ctx, t, sinkName, e.sink, "--also", echoName+"="+e.echo, "--allow-user", "bench"); prot.err == nil {
			if prot.sink, _, prot.err = e.startForward(ctx, net.JoinHostPort(host(sinkName), portOf(e.sink)), "--transport", t); prot.err == nil {
				prot.echo, _, prot.err = e.startForward(ctx, net.JoinHostPort(host(echoName), portOf(e.echo)), "--transport", t)
			}
			// The same agent, dialed session by session (tp-e2e/3 attaches).
			if each.sink, _, each.err = e.startForward(ctx, net.JoinHostPort(host(sinkName), portOf(e.sink)), "--transport", t, "--no-e2e-mux"); each.err == nil {
				each.echo, _, each.err = e.startForward(ctx, net.JoinHostPort(host(echoName), portOf(e.echo)), "--transport", t, "--no-e2e-mux")
			}
		} else {
			each.err = prot.err
		}

		sinkPort, echoPort := e.publicPorts[2*i], e.publicPorts[2*i+1]
		if _, pub.err = e.startExpose(ctx, t, "psink-"+t, e.sink, "--public", strconv.Itoa(sinkPort)); pub.err == nil {
			if _, pub.err = e.startExpose(ctx, t, "pecho-"+t, e.echo, "--public", strconv.Itoa(echoPort)); pub.err == nil {
				pub.sink = net.JoinHostPort("127.0.0.1", strconv.Itoa(sinkPort))
				pub.echo = net.JoinHostPort("127.0.0.1", strconv.Itoa(echoPort))
			}
		}
	}
	// A direct path (tp --direct, PROTOCOL 11.4.2): the pair's QUIC connection
	// goes between the two processes over loopback once ICE found it; the
	// relay (tpd) carries only its start.
	dt := transports[len(transports)-1]
	direct := &revPath{label: "tp expose over " + strings.ToUpper(dt) + ", protected, direct path (dialer: tp --direct forward)", transport: dt}
	var directProc, directEchoProc *proc
	loop := []string{"--direct-interfaces", "lo"}
	if _, direct.err = e.startExpose(ctx, dt, "dsink", e.sink, append([]string{"--also", "decho=" + e.echo, "--allow-user", "bench"}, loop...)...); direct.err == nil {
		fargs := append([]string{"--transport", dt, "--direct", "--debug"}, loop...)
		if direct.sink, directProc, direct.err = e.startForward(ctx, net.JoinHostPort(host("dsink"), portOf(e.sink)), fargs...); direct.err == nil {
			direct.echo, directEchoProc, direct.err = e.startForward(ctx, net.JoinHostPort(host("decho"), portOf(e.echo)), fargs...)
		}
	}
	paths = append(paths, direct)
	// frp, the reverse peer: `tcp` (public: frps's port, like --public) and
	// `stcp` (secret mode: the dialer runs a visitor, like a protected name).
	frpTCP := &revPath{label: "frp tcp (dialer: plain TCP to frps's port)", transport: "tls"}
	frpSTCP := &revPath{label: "frp stcp, secret mode (dialer: frpc visitor)", transport: "tls"}
	for _, fp := range []*revPath{frpTCP, frpSTCP} {
		if why := e.peers.why(peerFrps, peerFrpc); why != "" {
			fp.err = errors.New(why)
		} else if addrs, _, err := e.frpChain(ctx, nil, fp == frpSTCP, e.csink, e.echo); err != nil {
			fp.err = err
		} else {
			fp.sink, fp.echo, fp.counted = addrs[0], addrs[1], true
		}
		paths = append(paths, fp)
	}
	frpNote := e.peerNote(peerFrps, peerFrpc)
	frpBulkNote := frpNote + "; to the counted sink (frp ends both directions at a half-close)"

	for _, p := range paths {
		if p.err == nil {
			p.err = warm(func() error {
				if _, err := roundTrip(p.echo); err != nil {
					return fmt.Errorf("echo: %w", err)
				}
				_, err := bulkOnce(func() (*stream, error) { return tcpStream(p.sink) }, 1<<20, p.counted)
				return err
			})
		}
		if p.err != nil {
			e.log("%s: %v", p.label, p.err)
		}
	}

	// Measured on the direct path, not on the relay each pair starts on: every
	// pair the process opened has moved (a pair idle for a minute ends, and
	// the next session opens another).
	onDirect := func(pr *proc) error {
		deadline := time.Now().Add(30 * time.Second)
		for {
			log := pr.out.String()
			if strings.Count(log, "moved to a direct path") >= strings.Count(log, "a pair with the agent opened") {
				return nil
			}
			if time.Now().After(deadline) {
				return errors.New("the pair did not move to a direct path within 30 s")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if direct.err == nil {
		if direct.err = onDirect(directProc); direct.err != nil {
			e.log("%s: %v", direct.label, direct.err)
		}
	}

	// Bulk: MB/s to the sink.
	bulkRows := map[*revPath]*Row{}
	var bulkVs []*variant
	for _, p := range paths {
		r := &Row{Scenario: bulkScn, Variant: p.label, Transport: p.transport, Unit: "MB/s"}
		if p.transport != "tcp" {
			r.Baseline = "direct TCP"
		}
		if p.err != nil {
			r.Err = firstLine(p.err.Error())
		} else if p == frpTCP || p == frpSTCP {
			r.Note = frpBulkNote
		}
		bulkRows[p] = r
		addr, counted := p.sink, p.counted
		bulkVs = append(bulkVs, &variant{rows: []*Row{r}, fn: func() ([]float64, error) {
			return bulkOnce(func() (*stream, error) { return tcpStream(addr) }, sz.bulkBytes, counted)
		}})
	}

	// New-session latency: sequential connections, 1 byte each way.
	n := sz.setupConns
	type pair struct{ p50, p99 *Row }
	setupRows := map[*revPath]pair{}
	var setupVs []*variant
	directName := fmt.Sprintf("direct TCP, %d conns", n)
	for _, p := range paths {
		name := fmt.Sprintf("%s, %d conns", p.label, n)
		p50 := &Row{Scenario: setupScn, Variant: name + ", p50", Transport: p.transport, Unit: "ms"}
		p99 := &Row{Scenario: setupScn, Variant: name + ", p99", Transport: p.transport, Unit: "ms"}
		if p.transport != "tcp" {
			p50.Baseline, p99.Baseline = directName+", p50", directName+", p99"
		}
		if p.err != nil {
			p50.Err, p99.Err = firstLine(p.err.Error()), firstLine(p.err.Error())
		} else if p == frpTCP || p == frpSTCP {
			p50.Note = frpNote
		}
		setupRows[p] = pair{p50, p99}
		addr := p.echo
		setupVs = append(setupVs, &variant{rows: []*Row{p50, p99}, fn: func() ([]float64, error) {
			return latencies(n, func() (time.Duration, error) { return roundTrip(addr) })
		}})
	}

	e.log("reverse: bulk")
	e.interleave(runs, bulkVs)
	e.log("reverse: new-session latency")
	if direct.err == nil { // the echo's pair may have idled out during the bulk runs
		_, err := roundTrip(direct.echo)
		if err == nil {
			err = onDirect(directEchoProc)
		}
		if err != nil {
			e.log("%s, new sessions: measured although %v", direct.label, err)
		}
	}
	e.interleave(runs, setupVs)

	// Ratios against frp only when it was given (its rows say so otherwise).
	withFRP := e.peers.why(peerFrps, peerFrpc) == ""
	rows := collect(bulkVs)
	for _, tr := range trios {
		up := strings.ToUpper(tr.fwd.transport)
		target := ""
		if tr.fwd.transport == "tls" {
			target = "≥1.0×"
		}
		rows = append(rows,
			ratioRow(bulkScn, up+" protected ÷ forward path (per run)", bulkRows[tr.prot], bulkRows[tr.fwd], ""),
			ratioRow(bulkScn, up+" public ÷ forward path (per run)", bulkRows[tr.pub], bulkRows[tr.fwd], ""),
			ratioRow(bulkScn, up+" protected ÷ public (per run)", bulkRows[tr.prot], bulkRows[tr.pub], target),
			ratioRow(bulkScn, up+" protected, one carrier ÷ a TP session each (per run)", bulkRows[tr.prot], bulkRows[tr.each], ""))
		if withFRP {
			rows = append(rows,
				ratioRow(bulkScn, up+" public ÷ frp tcp (per run)", bulkRows[tr.pub], bulkRows[frpTCP], ""),
				ratioRow(bulkScn, up+" protected ÷ frp stcp (per run)", bulkRows[tr.prot], bulkRows[frpSTCP], ""))
		}
	}
	up := strings.ToUpper(dt)
	for _, tr := range trios {
		if tr.fwd.transport == dt {
			rows = append(rows,
				ratioRow(bulkScn, up+" protected, direct path ÷ public (per run)", bulkRows[direct], bulkRows[tr.pub], "≥1.0×"),
				ratioRow(bulkScn, up+" protected, direct path ÷ one carrier (per run)", bulkRows[direct], bulkRows[tr.prot], ""))
		}
	}
	if withFRP {
		rows = append(rows, ratioRow(bulkScn, up+" protected, direct path ÷ frp stcp (per run)", bulkRows[direct], bulkRows[frpSTCP], ""))
	}
	rows = append(rows, collect(setupVs)...)
	for _, tr := range trios {
		up := strings.ToUpper(tr.fwd.transport)
		rows = append(rows,
			ratioRow(setupScn, up+" protected ÷ forward path, p50 (per run)", setupRows[tr.prot].p50, setupRows[tr.fwd].p50, ""),
			ratioRow(setupScn, up+" public ÷ forward path, p50 (per run)", setupRows[tr.pub].p50, setupRows[tr.fwd].p50, ""),
			ratioRow(setupScn, up+" protected ÷ public, p50 (per run)", setupRows[tr.prot].p50, setupRows[tr.pub].p50, ""),
			ratioRow(setupScn, up+" protected, one carrier ÷ a TP session each, p50 (per run)", setupRows[tr.prot].p50, setupRows[tr.each].p50, ""))
		if tr.fwd.transport == dt {
			rows = append(rows, ratioRow(setupScn, up+" protected, direct path ÷ one carrier, p50 (per run)", setupRows[direct].p50, setupRows[tr.prot].p50, ""))
			if withFRP {
				rows = append(rows, ratioRow(setupScn, up+" protected, direct path ÷ frp stcp, p50 (per run)", setupRows[direct].p50, setupRows[frpSTCP].p50, "≤1.0×"))
			}
		}
		if withFRP {
			rows = append(rows,
				ratioRow(setupScn, up+" public ÷ frp tcp, p50 (per run)", setupRows[tr.pub].p50, setupRows[frpTCP].p50, ""),
				ratioRow(setupScn, up+" protected ÷ frp stcp, p50 (per run)", setupRows[tr.prot].p50, setupRows[frpSTCP].p50, "≤1.0×"),
				ratioRow(setupScn, up+" protected, a TP session each ÷ frp stcp, p50 (per run)", setupRows[tr.each].p50, setupRows[frpSTCP].p50, ""))
		}
	}
	return rows, nil
}
