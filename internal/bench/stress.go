package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Scenarios 8–10 (load, slowloris, soak) share a tpd of their own, started with
// the settings they test and with the Go runtime tracing to stderr, so that its
// goroutines and live heap can be read from outside: tpd has no debug endpoint,
// and the instrument must not need one.

// stressTPD is the tpd of scenarios 8–10.
type stressTPD struct {
	proc             *proc
	addr             string
	home             string // TP_HOME of its enrolled device
	decisionLog      string
	handshakeTimeout time.Duration
	trace            *runtimeTrace
}

// startStressTPD starts the tpd of scenarios 8–10 with a handshake timeout of hs,
// a decision log, the per-device session bound lifted (one device opens
// thousands of tunnels) and the runtime's scheduler dump every traceEvery.
func (e *Env) startStressTPD(ctx context.Context, hs, traceEvery time.Duration) (*stressTPD, error) {
	if e.stress != nil {
		return e.stress, nil
	}
	data := filepath.Join(e.dir, "stress-data")
	if _, err := runCmd(ctx, time.Minute, nil, e.binary("tpd"), "init", "--data-dir", data); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(data, "policy", "tp.rego"), []byte(benchPolicy), 0o600); err != nil {
		return nil, err
	}
	s := &stressTPD{
		home:             filepath.Join(e.dir, "stress-home"),
		decisionLog:      filepath.Join(e.dir, "stress-decisions.jsonl"),
		handshakeTimeout: hs,
		trace:            newRuntimeTrace(),
	}
	env := []string{
		"TP_MAX_SESSIONS_PER_IDENTITY=1000000",
		"TP_HANDSHAKE_TIMEOUT=" + hs.String(),
		"TP_DECISION_LOG=" + s.decisionLog,
		fmt.Sprintf("GODEBUG=gctrace=1,schedtrace=%d,scheddetail=1", traceEvery.Milliseconds()),
	}
	listening := regexp.MustCompile(`listening on (\S+) \(`)
	cmd := command(e.binary("tpd"), []string{"serve", "--data-dir", data, "--listen", "127.0.0.1:0"}, env)
	stderr := &lineWriter{fn: s.trace.line, tail: &tail{}}
	cmd.Stderr = stderr
	p, err := e.startProc(ctx, "tpd (stress)", cmd, false, time.Minute, func(line string) bool {
		if m := listening.FindStringSubmatch(line); m != nil {
			s.addr = m[1]
		}
		return strings.HasPrefix(line, "CA fingerprint: ")
	})
	if err != nil {
		return nil, fmt.Errorf("%w\nstderr: %s", err, stderr.tail.String())
	}
	s.proc = p
	if err := e.enroll(ctx, data, "bench", "stress", "bench", s.home); err != nil {
		return nil, err
	}
	e.stress = s
	e.log("stress tpd pid %d on %s, handshake-timeout %s", p.pid(), s.addr, hs)
	return s, nil
}

// dialer is a client of the stress tpd over transport, as `tp` builds it.
func (s *stressTPD) dialer(transport string) (*clients.Dialer, error) {
	h := clients.Home{Dir: s.home}
	cert, err := h.Certificate()
	if err != nil {
		return nil, err
	}
	root, err := h.Root()
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	return &clients.Dialer{
		Server:    s.addr,
		Transport: transport,
		Timeout:   30 * time.Second,
		TLSConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert},
			ClientSessionCache: tls.NewLRUClientSessionCache(64)},
	}, nil
}

// usage is one reading of the stress tpd's resources.
type usage struct {
	rssMiB, fds, threads, goroutines, heapMB float64
}

func (s *stressTPD) usage() (usage, error) {
	pid := s.proc.pid()
	rss, err := rssKiB(pid)
	if err != nil {
		return usage{}, err
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return usage{}, err
	}
	threads, err := procStatus(pid, "Threads:")
	if err != nil {
		return usage{}, err
	}
	heap, g := s.trace.read()
	return usage{rssMiB: float64(rss) / 1024, fds: float64(len(fds)), threads: float64(threads), goroutines: g, heapMB: heap}, nil
}

func (u usage) String() string {
	return fmt.Sprintf("RSS %.0f MiB, %s goroutines, %.0f fds, %.0f threads, live heap %s MB",
		u.rssMiB, fmtNum(u.goroutines), u.fds, u.threads, fmtNum(u.heapMB))
}

// procStatus is the first number after key in /proc/PID/status.
func procStatus(pid int, key string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, key); ok {
			var n int64
			_, err := fmt.Sscan(strings.TrimSpace(v), &n)
			return n, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", key, pid)
}

// decisions counts the decision log's lines and those whose evaluation failed
// (the request was denied with policy_error).
func (s *stressTPD) decisions() (total, failed int, err error) {
	f, err := os.Open(s.decisionLog)
	if errors.Is(err, os.ErrNotExist) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		total++
		if strings.Contains(sc.Text(), `"error":"`) {
			failed++
		}
	}
	return total, failed, sc.Err()
}

// isPolicyError reports whether err is tpd's policy_error refusal.
func isPolicyError(err error) bool {
	var re *clients.RefusedError
	return errors.As(err, &re) && re.Code == wire.CodePolicyError
}

// gauge rows for one reading of tpd's resources.
func usageRows(scn, label string, u usage) []Row {
	mk := func(what, unit string, v float64) Row {
		r := Row{Scenario: scn, Variant: "tpd " + what + ", " + label, Transport: "tls", Unit: unit}
		if math.IsNaN(v) {
			r.Err = "not read (no runtime trace yet)"
		} else {
			r.Runs = []float64{v}
		}
		return r
	}
	return []Row{
		mk("RSS", "MiB", u.rssMiB), mk("goroutines", "goroutines", u.goroutines),
		mk("open fds", "fds", u.fds), mk("live heap", "MB", u.heapMB), mk("threads", "threads", u.threads),
	}
}
