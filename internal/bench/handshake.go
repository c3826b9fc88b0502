package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// handshakeWorkers is the number of concurrent clients. Client and server share
// the 2 cores, so more clients only queue.
const handshakeWorkers = 4

// load runs dial from handshakeWorkers goroutines for d and returns handshakes per
// second, the server's CPU milliseconds per handshake (from /proc/PID/stat) and
// the fraction of handshakes that resumed a session.
func load(d time.Duration, pid int, dial func(w int) (resumed bool, err error)) ([]float64, float64, error) {
	for w := range handshakeWorkers { // warm up: caches hold a ticket, code paths are hot
		if _, err := dial(w); err != nil {
			return nil, 0, err
		}
	}
	before, err := cpuTicks(pid)
	if err != nil {
		return nil, 0, err
	}
	var count, resumed atomic.Int64
	var firstErr error
	var once sync.Once
	stop := time.Now().Add(d)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range handshakeWorkers {
		wg.Go(func() {
			for time.Now().Before(stop) {
				r, err := dial(w)
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
				count.Add(1)
				if r {
					resumed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	after, err := cpuTicks(pid)
	if err != nil {
		return nil, 0, err
	}
	if firstErr != nil {
		return nil, 0, firstErr
	}
	n := float64(count.Load())
	if n == 0 {
		return nil, 0, errors.New("no handshake completed")
	}
	cpuMs := float64(after-before) * 1000 / ticksPerSecond
	return []float64{n / elapsed.Seconds(), cpuMs / n}, float64(resumed.Load()) / n, nil
}

func handshakes(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "3 handshakes"
	cert, tpRoots, err := e.deviceTLS()
	if err != nil {
		return nil, err
	}
	ca, err := e.ca()
	if err != nil {
		return nil, err
	}
	plainAddr, plain, err := e.startHelper(ctx, "tls-echo", "-cert", ca.certFile, "-key", ca.keyFile, "-client-ca", e.home+"/root.pem")
	if err != nil {
		return nil, err
	}
	caches := func(resume bool) []tls.ClientSessionCache {
		cs := make([]tls.ClientSessionCache, handshakeWorkers)
		for i := range cs {
			if resume {
				cs[i] = tls.NewLRUClientSessionCache(4)
			}
		}
		return cs
	}
	plainDial := func(resume bool) func(int) (bool, error) {
		cs := caches(resume)
		return func(w int) (bool, error) {
			cfg := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
				RootCAs: ca.roots, ServerName: "127.0.0.1", ClientSessionCache: cs[w]}
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", plainAddr, cfg)
			if err != nil {
				return false, err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write([]byte{'x'}); err != nil {
				return false, err
			}
			var b [1]byte
			if _, err := io.ReadFull(c, b[:]); err != nil {
				return false, fmt.Errorf("plain TLS server: %w", err)
			}
			return c.ConnectionState().DidResume, nil
		}
	}
	// TP's side of the comparison speaks the wire protocol directly over one TLS
	// connection (not clients.Dialer, which may pick QUIC): handshake, client
	// hello for the echo server, server hello. tpd checks the policy and dials.
	host, port := "127.0.0.1", atoi(portOf(e.echo))
	tpDial := func(resume, refused bool) func(int) (bool, error) {
		cs := caches(resume)
		return func(w int) (bool, error) {
			cfg := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
				RootCAs: tpRoots, ServerName: "127.0.0.1", NextProtos: []string{wire.ALPN}, ClientSessionCache: cs[w]}
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", e.tpdAddr, cfg)
			if err != nil {
				return false, err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			hello := wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: host, Port: port}
			if refused {
				hello.Op = "tpbench-unknown" // refused after parsing: no policy, no dial
			}
			if err := wire.WriteClientHello(c, hello); err != nil {
				return false, err
			}
			sh, err := wire.ReadServerHello(c)
			if err != nil {
				return false, fmt.Errorf("tpd: %w", err)
			}
			if refused && sh.Code != wire.CodeUnknownOp {
				return false, fmt.Errorf("tpd answered %s to an unknown op, want %s", sh.Code, wire.CodeUnknownOp)
			}
			if !sh.OK && !refused {
				return false, fmt.Errorf("tpd refused: %s: %s", sh.Code, sh.Reason)
			}
			return c.ConnectionState().DidResume, nil
		}
	}
	var vs []*variant
	for _, kind := range []string{"full", "resumed"} {
		resume := kind == "resumed"
		base := "plain Go TLS server, " + kind
		for _, side := range []struct {
			name string
			pid  int
			dial func(int) (bool, error)
		}{
			{base, plain.pid(), plainDial(resume)},
			{"tpd, " + kind + " (+ hello, policy, dial)", e.tpd.pid(), tpDial(resume, false)},
			{"tpd, " + kind + " (+ refused hello)", e.tpd.pid(), tpDial(resume, true)},
		} {
			rate := &Row{Scenario: scn, Variant: side.name, Transport: "tls", Unit: "handshakes/s"}
			cpu := &Row{Scenario: scn, Variant: side.name + ", server CPU", Transport: "tls", Unit: "ms/handshake"}
			if side.name != base {
				rate.Baseline, rate.Target = base, "≥0.9×"
				cpu.Baseline = base + ", server CPU"
			}
			vs = append(vs, &variant{rows: []*Row{rate, cpu}, fn: func() ([]float64, error) {
				vals, frac, err := load(sz.handshakeTime, side.pid, side.dial)
				if err == nil && resume && frac < 0.99 {
					rate.Note = fmt.Sprintf("only %.0f%% resumed", frac*100)
				}
				if err == nil && !resume && frac > 0 {
					rate.Note = fmt.Sprintf("%.0f%% resumed unexpectedly", frac*100)
				}
				return vals, err
			}})
		}
	}
	e.interleave(runs, vs)
	return collect(vs), nil
}
