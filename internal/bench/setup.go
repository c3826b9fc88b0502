package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
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
	start := time.Now()
	s, err := procStream(e, name, args, env)
	if err != nil {
		return 0, err
	}
	watchdog := time.AfterFunc(30*time.Second, func() { s.close() })
	defer watchdog.Stop()
	if _, err := s.w.Write([]byte{'x'}); err != nil {
		s.close()
		return 0, err
	}
	var b [1]byte
	if _, err := io.ReadFull(s.r, b[:]); err != nil {
		return 0, fmt.Errorf("no echo: %w (%v)", err, s.close())
	}
	d := time.Since(start)
	return d, s.close()
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

	tpName := fmt.Sprintf("tp forward, new TLS conn, %d conns", sz.setupConns)
	if addr, _, err := e.startForward(ctx, e.echo, e.tlsArgs()...); err != nil {
		vs = append(vs, failed(tpName, "tls", err))
	} else {
		vs = append(vs, pair(tpName, "tls", direct, "", func() (time.Duration, error) { return roundTrip(addr) }, sz.setupConns))
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
	fresh := func(transport string, args ...string) *variant {
		name := freshTP
		if transport != "tls" || e.quicStdio {
			name = fmt.Sprintf("fresh `tp --transport %s HOST PORT`, %d procs", transport, sz.setupProcs)
		}
		if transport == "tls" && e.quicStdio {
			args = append([]string{"--transport", "tls"}, args...)
		}
		return pair(name, transport, sshW, "≤0.25× ssh -W", func() (time.Duration, error) {
			return processRoundTrip(e, e.binary("tp"), args, e.tpEnv())
		}, sz.setupProcs)
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
	interleave(runs, vs, e.log)
	return collect(vs), nil
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
