package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// batchWithin bounds how long a batch of k idle tunnels may take to open: far
// more than a working system needs on a loaded machine, far less than tunnels
// that wait for a slot that never frees (a stream limit) would take one by one.
func batchWithin(k int) time.Duration { return time.Minute + time.Duration(k)*20*time.Millisecond }

// openTunnels opens k tunnels to addr (an echo behind it) with bounded
// concurrency; each is established end to end (one byte echoed) and then idle.
// All must be open within batchWithin(k).
func openTunnels(addr string, k int) ([]net.Conn, error) {
	within := batchWithin(k)
	deadline := time.Now().Add(within)
	conns := make([]net.Conn, k)
	errs := make(chan error, k)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := range k {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", addr, min(30*time.Second, time.Until(deadline)))
			if err != nil {
				errs <- fmt.Errorf("tunnel %d of %d (all due within %s): %w", i+1, k, within, err)
				return
			}
			c.SetDeadline(deadline)
			var b [1]byte
			if _, err := c.Write([]byte{'x'}); err == nil {
				_, err = io.ReadFull(c, b[:])
			}
			if err != nil {
				c.Close()
				errs <- fmt.Errorf("tunnel %d of %d (all due within %s): %w", i+1, k, within, err)
				return
			}
			c.SetDeadline(time.Time{})
			conns[i] = c
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		closeAll(conns)
		return nil, err
	}
	return conns, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// settle gives the processes a moment to finish their bookkeeping (goroutines
// parked, buffers returned) before RSS is read. It is a measurement pause, not a
// readiness wait: every tunnel has already echoed a byte.
const settle = 500 * time.Millisecond

// maxHeld bounds the tunnels one holder keeps open (two descriptors each).
const maxHeld = 100_000

// runIdleHelper is scenario 4's holder, a process of its own per system measured,
// so that neither its descriptors nor its memory count against tpbench or the
// system: it runs an echo server (printing "ADDR host:port"), and for each line
// "open ADDR N" on stdin opens N more tunnels to ADDR, keeps them idle and
// answers "OK total" or "ERR why". It closes them all when stdin ends.
func runIdleHelper(ctx context.Context, stdin io.Reader, stdout io.Writer) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	stop := serve(ln, echoHandler)
	defer stop()
	var held []net.Conn
	defer func() { closeAll(held) }()
	fmt.Fprintf(stdout, "ADDR %s\n", ln.Addr())
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdin)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	for {
		var line string
		var ok bool
		select {
		case <-ctx.Done():
			return nil
		case line, ok = <-lines:
			if !ok {
				return nil
			}
		}
		addr, n, err := parseOpen(line, maxHeld-len(held))
		if err == nil {
			var conns []net.Conn
			if conns, err = openTunnels(addr, n); err == nil {
				held = append(held, conns...)
			}
		}
		if err != nil {
			fmt.Fprintf(stdout, "ERR %s\n", firstLine(err.Error()))
			continue
		}
		fmt.Fprintf(stdout, "OK %d\n", len(held))
	}
}

// parseOpen reads a holder command, "open ADDR N", with 1 ≤ N ≤ room.
func parseOpen(line string, room int) (string, int, error) {
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "open" {
		return "", 0, fmt.Errorf("bad command %q: want \"open ADDR N\"", line)
	}
	if _, _, err := net.SplitHostPort(f[1]); err != nil {
		return "", 0, fmt.Errorf("bad address in %q: %w", line, err)
	}
	n, err := strconv.Atoi(f[2])
	if err != nil || n < 1 {
		return "", 0, fmt.Errorf("bad count in %q: want a positive number", line)
	}
	if n > room {
		return "", 0, fmt.Errorf("%d more tunnels would exceed the holder's bound (%d left of %d)", n, room, maxHeld)
	}
	return f[1], n, nil
}

// holder is the tpbench side of a runIdleHelper process.
type holder struct {
	p     *proc
	in    io.WriteCloser
	lines chan string
	echo  string // its echo server: the destination of the system's tunnels
}

func (e *Env) startHolder(ctx context.Context) (*holder, error) {
	cmd := command(e.self, []string{helperArg, "idle-echo"}, nil)
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	p := &proc{name: "idle holder", cmd: cmd, out: &tail{}, done: make(chan struct{})}
	cmd.Stderr = p.out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the idle holder: %w", err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	h := &holder{p: p, in: in, lines: make(chan string, 4)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
		close(h.lines)
		p.err = cmd.Wait()
		close(p.done)
	}()
	line, err := h.answer(ctx, 30*time.Second)
	if err != nil {
		return nil, err
	}
	m := addrRe.FindStringSubmatch(line)
	if m == nil {
		return nil, fmt.Errorf("idle holder said %q, want its address", line)
	}
	h.echo = m[1]
	return h, nil
}

func (h *holder) answer(ctx context.Context, within time.Duration) (string, error) {
	t := time.NewTimer(within)
	defer t.Stop()
	select {
	case line, ok := <-h.lines:
		if !ok {
			return "", fmt.Errorf("idle holder exited: %s", lastLine(h.p.out.String()))
		}
		return line, nil
	case <-t.C:
		return "", fmt.Errorf("idle holder did not answer within %s", within)
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// open asks the holder for n more idle tunnels through addr and returns how many it holds.
func (h *holder) open(ctx context.Context, addr string, n int) (int, error) {
	if _, err := fmt.Fprintf(h.in, "open %s %d\n", addr, n); err != nil {
		return 0, err
	}
	line, err := h.answer(ctx, batchWithin(n)+30*time.Second)
	if err != nil {
		return 0, err
	}
	if why, ok := strings.CutPrefix(line, "ERR "); ok {
		return 0, fmt.Errorf("%s", why)
	}
	total, err := strconv.Atoi(strings.TrimPrefix(line, "OK "))
	if err != nil {
		return 0, fmt.Errorf("idle holder said %q", line)
	}
	return total, nil
}

// release ends the holder: it closes every tunnel it holds and exits.
func (h *holder) release() {
	h.in.Close()
	select {
	case <-h.p.done:
	case <-time.After(30 * time.Second):
		h.p.stop()
	}
}

// memSystem is one thing whose idle tunnels scenario 4 weighs: a server process
// and a client process, started in front of a holder's echo server.
type memSystem struct {
	server, client         string // row labels
	transport              string
	serverBase, clientBase string // baselines' labels
	target                 string
	bins                   []string // peer binaries it needs; nil for TP and the relay
	start                  func(echo string) (addr string, server, client *proc, err error)

	h                    *holder
	addr                 string
	serverPid, clientPid int
	sr, cr               *Row
	slowest              time.Duration // the longest a batch took to open
}

func memory(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "4 idle tunnel memory"
	unit := "KiB/tunnel"
	relayServer, relayClient := "minimal relay server", "minimal relay client"
	// Every server starts fresh here, tpd and frps included (the run's shared
	// ones have served the scenarios before): a server warm from earlier traffic
	// has heap to spare, and its first batch would look lighter than it is.
	tpd, home, tpdErr := e.startFreshTPD(ctx, "memory")
	tp := func(transport string) func(string) (string, *proc, *proc, error) {
		return func(echo string) (string, *proc, *proc, error) {
			if tpdErr != nil {
				return "", nil, nil, tpdErr
			}
			args := []string{"--transport", transport}
			if transport == "tls" && !e.quic {
				args = nil
			}
			addr, fwd, err := e.startForwardAs(ctx, home, echo, args...)
			return addr, tpd, fwd, err
		}
	}
	systems := []*memSystem{
		{server: relayServer, client: relayClient, transport: "tls", start: func(echo string) (string, *proc, *proc, error) {
			return e.relayChain(ctx, echo)
		}},
		{server: "tpd (TP over TLS)", client: "tp forward (TLS)", transport: "tls", serverBase: relayServer, clientBase: relayClient, target: "≤ frps",
			start: tp("tls")},
	}
	if e.quic {
		systems = append(systems, &memSystem{server: "tpd (TP over QUIC)", client: "tp forward (QUIC)", transport: "quic", serverBase: relayServer, clientBase: relayClient, target: "≤ frps",
			start: tp("quic")})
	}
	if e.compare != "" {
		// TP once more with the older binaries (--compare), tpd and tp both, in
		// the same interleaved runs: what a change did to an idle tunnel. The
		// older tpd carries a TLS batch and then a QUIC batch per run, as this
		// tree's does, so that each TLS batch meets a heap grown as the other's.
		oldTPD, oldHome, oldErr := e.startFreshTPDWith(ctx, filepath.Join(e.compare, "tpd"), "memory-compare")
		old := func(transport string) func(string) (string, *proc, *proc, error) {
			return func(echo string) (string, *proc, *proc, error) {
				if oldErr != nil {
					return "", nil, nil, oldErr
				}
				args := []string{"--transport", transport}
				if transport == "tls" && !e.quic {
					args = nil
				}
				addr, fwd, err := e.startForwardWith(ctx, filepath.Join(e.compare, "tp"), oldHome, echo, args...)
				return addr, oldTPD, fwd, err
			}
		}
		systems = append(systems, &memSystem{server: "tpd of --compare (TLS)", client: "tp forward of --compare (TLS)", transport: "tls",
			serverBase: relayServer, clientBase: relayClient, start: old("tls")})
		if e.quic {
			systems = append(systems, &memSystem{server: "tpd of --compare (QUIC)", client: "tp forward of --compare (QUIC)", transport: "quic",
				serverBase: relayServer, clientBase: relayClient, start: old("quic")})
		}
	}
	chain := func(f func(context.Context, string) (peerChain, error)) func(string) (string, *proc, *proc, error) {
		return func(echo string) (string, *proc, *proc, error) {
			c, err := f(ctx, echo)
			return c.addr, c.server, c.client, err
		}
	}
	systems = append(systems,
		&memSystem{server: "ghostunnel server", client: "ghostunnel client", transport: "tls", serverBase: relayServer, clientBase: relayClient,
			bins: []string{peerGhostunnel}, start: chain(e.ghostunnelChain)},
		&memSystem{server: "chisel server", client: "chisel client", transport: "ssh", serverBase: relayServer, clientBase: relayClient,
			bins: []string{peerChisel}, start: chain(e.chiselChain)},
		&memSystem{server: "frps (frp tcp)", client: "frpc (frp tcp agent)", transport: "tls", serverBase: relayServer, clientBase: relayClient,
			bins: []string{peerFrps, peerFrpc}, start: func(echo string) (string, *proc, *proc, error) {
				srv, err := e.startFrps(ctx, "frps-memory")
				if err != nil {
					return "", nil, nil, err
				}
				addrs, c, err := e.frpChain(ctx, srv, false, echo)
				if err != nil {
					return "", nil, nil, err
				}
				return addrs[0], c.server, c.client, nil
			}})

	// Every system's holder keeps runs×tunnels open, two descriptors each.
	var fdErr error
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && uint64(2*runs*sz.tunnels+256) > lim.Max {
		fdErr = fmt.Errorf("%d runs of %d tunnels need %d descriptors in one process, the limit is %d: use fewer --runs",
			runs, sz.tunnels, 2*runs*sz.tunnels+256, lim.Max)
	}

	// Start everything first, then measure every system in turn, run after run,
	// so that the machine's drifts and the processes' warm-up hit all alike.
	var live []*memSystem
	for _, s := range systems {
		s.sr = &Row{Scenario: scn, Variant: s.server + ", RSS", Transport: s.transport, Unit: unit, Target: s.target}
		s.cr = &Row{Scenario: scn, Variant: s.client + ", RSS", Transport: s.transport, Unit: unit}
		if s.serverBase != "" {
			s.sr.Baseline, s.cr.Baseline = s.serverBase+", RSS", s.clientBase+", RSS"
		}
		if why := e.peers.why(s.bins...); why != "" {
			s.sr.Err, s.cr = why, nil
			continue
		}
		err := fdErr
		if err == nil {
			s.h, err = e.startHolder(ctx)
		}
		if err == nil {
			var srv, cli *proc
			if s.addr, srv, cli, err = s.start(s.h.echo); err == nil {
				s.serverPid, s.clientPid = srv.pid(), cli.pid()
			}
		}
		if err != nil {
			e.log("%s: %v", s.server, err)
			s.sr.Err, s.cr.Err = firstLine(err.Error()), firstLine(err.Error())
			continue
		}
		live = append(live, s)
	}
	for i := range runs {
		for _, s := range live {
			if s.sr.Err != "" {
				continue
			}
			err := func() error {
				time.Sleep(settle)
				sBefore, err1 := rssKiB(s.serverPid)
				cBefore, err2 := rssKiB(s.clientPid)
				if err1 != nil || err2 != nil {
					return fmt.Errorf("reading RSS: %v %v", err1, err2)
				}
				t0 := time.Now()
				total, err := s.h.open(ctx, s.addr, sz.tunnels)
				if err != nil {
					return err
				}
				s.slowest = max(s.slowest, time.Since(t0))
				time.Sleep(settle)
				sAfter, err1 := rssKiB(s.serverPid)
				cAfter, err2 := rssKiB(s.clientPid)
				if err1 != nil || err2 != nil {
					return fmt.Errorf("reading RSS: %v %v", err1, err2)
				}
				s.sr.Runs = append(s.sr.Runs, float64(sAfter-sBefore)/float64(sz.tunnels))
				s.cr.Runs = append(s.cr.Runs, float64(cAfter-cBefore)/float64(sz.tunnels))
				e.log("  run %d %-24s %d tunnels open: server RSS %d MiB (+%.1f KiB/tunnel), client RSS %d MiB (+%.1f KiB/tunnel)",
					i+1, s.server, total, sAfter>>10, s.sr.Runs[i], cAfter>>10, s.cr.Runs[i])
				return nil
			}()
			if err != nil {
				e.log("%s: %v", s.server, err)
				s.sr.Err, s.sr.Runs, s.cr.Err, s.cr.Runs = firstLine(err.Error()), nil, firstLine(err.Error()), nil
			}
		}
	}
	for _, s := range live {
		s.h.release()
	}
	// Let the processes see the closes before the next scenario.
	time.Sleep(2 * settle)

	note := fmt.Sprintf("growth per batch of %d, systems in turn, %d open at the end; fresh servers", sz.tunnels, runs*sz.tunnels)
	var rows []Row
	var frps *Row
	for _, s := range systems {
		if s.sr.Err == "" {
			s.sr.Note = note
			if s.slowest > 10*time.Second {
				s.sr.Note += fmt.Sprintf("; a batch took %s to open", s.slowest.Round(time.Second))
			}
			if v := e.peerNote(s.bins...); v != "" {
				s.sr.Note += "; " + v
			}
			s.cr.Note = s.sr.Note
		}
		rows = append(rows, *s.sr)
		if s.cr != nil {
			rows = append(rows, *s.cr)
		}
		if s.bins != nil && s.bins[0] == peerFrps {
			frps = s.sr
		}
	}
	if old := findSystem(systems, "tpd of --compare (TLS)"); old != nil && old.sr.Err == "" {
		cur := findSystem(systems, "tpd (TP over TLS)")
		if cur != nil && cur.sr.Err == "" {
			rows = append(rows,
				ratioRow(scn, "tpd (TLS) ÷ tpd of --compare (per run)", cur.sr, old.sr, ""),
				ratioRow(scn, "tp forward (TLS) ÷ tp forward of --compare (per run)", cur.cr, old.cr, ""))
		}
	}
	if frps != nil && frps.Err == "" {
		for _, s := range systems {
			if strings.HasPrefix(s.server, "tpd") {
				rows = append(rows,
					ratioRow(scn, s.server+" ÷ frps (per run)", s.sr, frps, "≤1.0×"),
					ratioRow(scn, s.client+" ÷ frps (per run)", s.cr, frps, "≤1.0×"))
			}
		}
	}
	return rows, nil
}

// findSystem is the system whose server row is named server, or nil.
func findSystem(systems []*memSystem, server string) *memSystem {
	for _, s := range systems {
		if s.server == server {
			return s
		}
	}
	return nil
}
