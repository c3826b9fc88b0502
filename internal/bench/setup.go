package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/tp-proxy/tp/clients"
)

// roundTrip opens one connection, sends one byte, waits for its echo and closes.
func roundTrip(addr string) (time.Duration, error) {
	start := time.Now()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{'x'}); err != nil {
		return 0, err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return 0, fmt.Errorf("no echo: %w", err)
	}
	return time.Since(start), nil
}

// processRoundTrip spawns a ProxyCommand-style process and times it from spawn to
// the first echoed byte (what an ssh login waits for), then lets it exit.
func processRoundTrip(e *Env, name string, args, env []string) (time.Duration, error) {
	d, _, err := processFirstByte(e, name, args, env)
	return d, err
}

// processFirstByte is processRoundTrip that also reads the process's resident
// memory (VmRSS, KiB) once the first byte has come back.
func processFirstByte(e *Env, name string, args, env []string) (time.Duration, int64, error) {
	start := time.Now()
	s, err := procStream(e, name, args, env)
	if err != nil {
		return 0, 0, err
	}
	watchdog := time.AfterFunc(30*time.Second, func() { s.close() })
	defer watchdog.Stop()
	if _, err := s.w.Write([]byte{'x'}); err != nil {
		s.close()
		return 0, 0, err
	}
	var b [1]byte
	if _, err := io.ReadFull(s.r, b[:]); err != nil {
		return 0, 0, fmt.Errorf("no echo: %w (%v)", err, s.close())
	}
	d := time.Since(start)
	rss, rerr := rssKiB(s.pid)
	if err := s.close(); err != nil {
		return 0, 0, err
	}
	return d, rss, rerr
}

// freshProcs runs n sequential fresh processes and returns the first-byte time's
// p50 and p99 (ms) and the median RSS at the first byte (KiB).
func freshProcs(e *Env, n int, name string, args, env []string) ([]float64, error) {
	ms := make([]float64, 0, n)
	rss := make([]float64, 0, n)
	for range n {
		d, kib, err := processFirstByte(e, name, args, env)
		if err != nil {
			return nil, err
		}
		ms = append(ms, float64(d)/float64(time.Millisecond))
		rss = append(rss, float64(kib))
	}
	slices.Sort(ms)
	slices.Sort(rss)
	return []float64{percentile(ms, 50), percentile(ms, 99), median(rss)}, nil
}

// latencies runs n sequential trials and returns p50 and p99 in milliseconds.
func latencies(n int, trial func() (time.Duration, error)) ([]float64, error) {
	ms := make([]float64, 0, n)
	for range n {
		d, err := trial()
		if err != nil {
			return nil, err
		}
		ms = append(ms, float64(d)/float64(time.Millisecond))
	}
	slices.Sort(ms)
	return []float64{percentile(ms, 50), percentile(ms, 99)}, nil
}

func setup(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "2 setup latency"
	pair := func(name, transport, baseline, target string, trial func() (time.Duration, error), n int) *variant {
		p50 := &Row{Scenario: scn, Variant: name + ", p50", Transport: transport, Unit: "ms", Target: target}
		p99 := &Row{Scenario: scn, Variant: name + ", p99", Transport: transport, Unit: "ms"}
		if baseline != "" {
			p50.Baseline, p99.Baseline = baseline+", p50", baseline+", p99"
		}
		return &variant{rows: []*Row{p50, p99}, fn: func() ([]float64, error) { return latencies(n, trial) }}
	}
	failed := func(name, transport string, err error) *variant {
		e.log("%s: %v", name, err)
		return &variant{rows: []*Row{{Scenario: scn, Variant: name, Transport: transport, Unit: "ms", Err: firstLine(err.Error())}}}
	}
	direct := fmt.Sprintf("direct TCP, %d conns", sz.setupConns)
	vs := []*variant{pair(direct, "tcp", "", "", func() (time.Duration, error) { return roundTrip(e.echo) }, sz.setupConns)}

	tpName := fmt.Sprintf("tp forward, new TLS tunnel (tp-mux/1 stream), %d conns", sz.setupConns)
	oldName := fmt.Sprintf("tp forward of --compare, new TLS tunnel, %d conns", sz.setupConns)
	if e.compare != "" {
		// The same forwarder, once with an older tp (--compare) against this
		// tree's tpd, in the same interleaved runs: what a change on the
		// client's side did to every new tunnel.
		if addr, _, err := e.startForwardWith(ctx, filepath.Join(e.compare, "tp"), e.home, e.echo, e.tlsArgs()...); err != nil {
			vs = append(vs, failed(oldName, "tls", err))
		} else {
			vs = append(vs, pair(oldName, "tls", direct, "", func() (time.Duration, error) { return roundTrip(addr) }, sz.setupConns))
		}
	}
	if addr, _, err := e.startForward(ctx, e.echo, e.tlsArgs()...); err != nil {
		vs = append(vs, failed(tpName, "tls", err))
	} else {
		baseline := direct
		if e.compare != "" {
			baseline = oldName
		}
		vs = append(vs, pair(tpName, "tls", baseline, "≤0.5× of --compare", func() (time.Duration, error) { return roundTrip(addr) }, sz.setupConns))
	}
	if e.quic {
		name := fmt.Sprintf("tp forward, new QUIC stream, %d conns", sz.setupConns)
		if addr, _, err := e.startForward(ctx, e.echo, "--transport", "quic"); err != nil {
			vs = append(vs, failed(name, "quic", err))
		} else {
			vs = append(vs, pair(name, "quic", direct, "<1 ms", func() (time.Duration, error) { return roundTrip(addr) }, sz.setupConns))
		}
	}

	sshW := fmt.Sprintf("fresh ssh -W via sshd, %d procs", sz.setupProcs)
	freshTP := fmt.Sprintf("fresh `tp HOST PORT`, %d procs", sz.setupProcs)
	host, port := "127.0.0.1", portOf(e.echo)
	freshRows := func(name, transport, baseline, target string) []*Row {
		rows := []*Row{
			{Scenario: scn, Variant: name + ", p50", Transport: transport, Unit: "ms", Target: target},
			{Scenario: scn, Variant: name + ", p99", Transport: transport, Unit: "ms"},
			{Scenario: scn, Variant: name + ", RSS at first byte", Transport: transport, Unit: "KiB"},
		}
		if baseline != "" {
			rows[0].Baseline, rows[1].Baseline = baseline+", p50", baseline+", p99"
		}
		return rows
	}
	fresh := func(transport string, args ...string) *variant {
		name := freshTP
		if transport != "tls" || e.quicStdio {
			name = fmt.Sprintf("fresh `tp --transport %s HOST PORT`, %d procs", transport, sz.setupProcs)
		}
		if transport == "tls" && e.quicStdio {
			args = append([]string{"--transport", "tls"}, args...)
		}
		return &variant{rows: freshRows(name, transport, sshW, "≤0.25× ssh -W"), fn: func() ([]float64, error) {
			return freshProcs(e, sz.setupProcs, e.binary("tp"), args, e.tpEnv())
		}}
	}
	if e.compare != "" {
		// The same fresh tp, once with an older binary (--compare), in the same
		// interleaved runs: the ratio says what a change did to every ssh login.
		old := fmt.Sprintf("fresh `tp HOST PORT` of --compare, %d procs", sz.setupProcs)
		args := []string{host, port}
		if e.quicStdio {
			args = append([]string{"--transport", "tls"}, args...)
		}
		vs = append(vs, &variant{rows: freshRows(old, "tls", "", ""), fn: func() ([]float64, error) {
			return freshProcs(e, sz.setupProcs, filepath.Join(e.compare, "tp"), args, e.tpEnv())
		}})
		cur := freshRows(fmt.Sprintf("fresh `tp HOST PORT` of this tree, %d procs", sz.setupProcs), "tls", old, "")
		cur[2].Baseline = old + ", RSS at first byte"
		vs = append(vs, &variant{rows: cur, fn: func() ([]float64, error) {
			return freshProcs(e, sz.setupProcs, e.binary("tp"), args, e.tpEnv())
		}})
	}
	vs = append(vs, fresh("tls", host, port))
	if e.quicStdio {
		vs = append(vs, fresh("quic", "--transport", "quic", host, port), fresh("auto", "--transport", "auto", host, port))
	}
	if s, err := e.startSSHD(ctx); err != nil {
		vs = append(vs, failed(sshW, "ssh", err))
	} else {
		args := s.sshArgs("-W", e.echo)
		vs = append(vs, pair(sshW, "ssh", "", "", func() (time.Duration, error) {
			return processRoundTrip(e, "ssh", args, nil)
		}, sz.setupProcs))
	}
	if e.quic {
		vs = append(vs, fallback(e, scn, sz.setupConns))
	}

	// New tunnels on a client that is already running and connected: ssh -L (a
	// channel on an open SSH connection) and the peers.
	n := sz.setupConns
	sshL := fmt.Sprintf("ssh -L, new channel, %d conns", n)
	if addr, err := e.startLocalForward(ctx, e.echo); err != nil {
		vs = append(vs, failed(sshL, "ssh", err))
	} else {
		vs = append(vs, pair(sshL, "ssh", direct, "", func() (time.Duration, error) { return roundTrip(addr) }, n))
	}
	// The Go floor of a new tunnel on an open connection, in the same runs:
	// ssh -L's protocol run by Go (golang.org/x/crypto/ssh), and raw quic-go (a
	// new stream, nothing of TP's on it).
	goSSH := fmt.Sprintf("Go SSH relay (x/crypto/ssh), new channel, %d conns", n)
	if addr, err := e.sshRelayChain(ctx, e.echo); err != nil {
		vs = append(vs, failed(goSSH, "ssh", err))
	} else {
		vs = append(vs, pair(goSSH, "ssh", direct, "", func() (time.Duration, error) { return roundTrip(addr) }, n))
	}
	rawQUIC := fmt.Sprintf("raw quic-go relay, new stream, %d conns", n)
	if e.quic {
		if addr, err := e.quicRelayChain(ctx, e.echo); err != nil {
			vs = append(vs, failed(rawQUIC, "quic", err))
		} else {
			vs = append(vs, pair(rawQUIC, "quic", direct, "", func() (time.Duration, error) { return roundTrip(addr) }, n))
		}
	}
	peer := func(name, transport string, bins []string, start func() (string, error)) *variant {
		if why := e.peers.why(bins...); why != "" {
			return notGiven(&Row{Scenario: scn, Variant: name, Transport: transport, Unit: "ms"}, why)
		}
		addr, err := start()
		if err != nil {
			return failed(name, transport, err)
		}
		v := pair(name, transport, direct, "", func() (time.Duration, error) { return roundTrip(addr) }, n)
		v.rows[0].Note = e.peerNote(bins...)
		return v
	}
	chain := func(f func(context.Context, string) (peerChain, error)) func() (string, error) {
		return func() (string, error) { c, err := f(ctx, e.echo); return c.addr, err }
	}
	frp := func(stcp bool) func() (string, error) {
		return func() (string, error) {
			addrs, _, err := e.frpChain(ctx, nil, stcp, e.echo)
			if err != nil {
				return "", err
			}
			return addrs[0], nil
		}
	}
	ghost := fmt.Sprintf("ghostunnel, new TLS conn, %d conns", n)
	chisel := fmt.Sprintf("chisel, new SSH channel, %d conns", n)
	frpTCP := fmt.Sprintf("frp tcp, via frps's public port, %d conns", n)
	frpSTCP := fmt.Sprintf("frp stcp (secret mode), via visitor, %d conns", n)
	vs = append(vs,
		peer(ghost, "tls", []string{peerGhostunnel}, chain(e.ghostunnelChain)),
		peer(chisel, "ssh", []string{peerChisel}, chain(e.chiselChain)),
		peer(frpTCP, "tls", []string{peerFrps, peerFrpc}, frp(false)),
		peer(frpSTCP, "tls", []string{peerFrps, peerFrpc}, frp(true)))

	e.interleave(runs, vs)
	rows := collect(vs)
	quicName := fmt.Sprintf("tp forward, new QUIC stream, %d conns", n)
	for _, c := range []struct{ num, den, target string }{
		{quicName, sshL, "≤1.2×"},
		{tpName, oldName, "≤0.5×"},
		{tpName, sshL, "≤1.0×"},
		{tpName, ghost, ""},
		{quicName, chisel, ""},
		{quicName, frpTCP, ""},
		{tpName, goSSH, ""},
		{quicName, rawQUIC, ""},
		{goSSH, sshL, ""},
		{rawQUIC, sshL, ""},
	} {
		num, den := find(vs, c.num+", p50"), find(vs, c.den+", p50")
		if num == nil || den == nil {
			continue // not measured in this run (no QUIC) or a peer not given
		}
		short := func(s string) string { return strings.TrimSuffix(s, fmt.Sprintf(", %d conns", n)) }
		rows = append(rows, ratioRow(scn, short(c.num)+" ÷ "+short(c.den)+", p50 (per run)", num, den, c.target))
	}
	return append(rows, binarySizes(e, scn)...), nil
}

// binarySizes are the sizes of the binaries this run built, compared with those
// in --compare when given.
func binarySizes(e *Env, scn string) []Row {
	var rows []Row
	for _, b := range []string{"tp", "dlogin", "tpd"} {
		size := func(path string) Row {
			r := Row{Scenario: scn, Variant: "binary size, " + b, Transport: "-", Unit: "MB"}
			if fi, err := os.Stat(path); err != nil {
				r.Err = firstLine(err.Error())
			} else {
				r.Runs = []float64{float64(fi.Size()) / 1e6}
			}
			return r
		}
		cur := size(e.binary(b))
		if e.compare != "" {
			old := size(filepath.Join(e.compare, b))
			old.Variant += " of --compare"
			cur.Baseline = old.Variant
			rows = append(rows, old)
		}
		rows = append(rows, cur)
	}
	return rows
}

// fallback times the auto transport's first dial when UDP goes unanswered (a
// network that drops it): QUIC's handshake gets no reply, TLS starts after the
// head start and wins. Each trial is a new Dialer, so no cache of an earlier
// winner helps; the QUIC attempt goes to a UDP socket that never answers.
func fallback(e *Env, scn string, n int) *variant {
	name := fmt.Sprintf("auto, first dial, UDP unanswered (falls back to TLS), %d dials", n)
	fail := func(err error) *variant {
		e.log("%s: %v", name, err)
		return &variant{rows: []*Row{{Scenario: scn, Variant: name, Transport: "auto", Unit: "ms", Err: firstLine(err.Error())}}}
	}
	c, err := clients.Open(clients.Home{Dir: e.home})
	if err != nil {
		return fail(err)
	}
	hole, err := net.ListenPacket("udp", "127.0.0.1:0") // reads nothing, answers nothing
	if err != nil {
		return fail(err)
	}
	p50 := &Row{Scenario: scn, Variant: name + ", p50", Transport: "auto", Unit: "ms", Target: "head start (150 ms) + one TLS dial"}
	p99 := &Row{Scenario: scn, Variant: name + ", p99", Transport: "auto", Unit: "ms"}
	return &variant{rows: []*Row{p50, p99}, fn: func() ([]float64, error) {
		return latencies(n, func() (time.Duration, error) {
			d, err := c.Dialer()
			if err != nil {
				return 0, err
			}
			defer d.Close()
			d.Transport, d.QUICServer, d.Timeout = clients.TransportAuto, hole.LocalAddr().String(), 10*time.Second
			d.Cache = nil // no earlier winner: every trial is a first dial
			start := time.Now()
			conn, err := d.DialContext(context.Background(), "tcp", e.echo)
			if err != nil {
				return 0, err
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := conn.Write([]byte{'x'}); err != nil {
				return 0, err
			}
			if _, err := io.ReadFull(conn, make([]byte, 1)); err != nil {
				return 0, fmt.Errorf("no echo: %w", err)
			}
			return time.Since(start), nil
		})
	}}
}
