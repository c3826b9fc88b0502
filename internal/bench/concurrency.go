package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Scenario "concurrency": N tunnels open at once through one `tp forward`, over
// TLS and over QUIC (no ceiling on concurrency). Each carrier gets a
// fresh tpd (the bounds per device and max-conns lifted: one device opens every
// tunnel) and a fresh tp forward, in front of an echo server in a process of its
// own; tpbench holds the client ends. It reports the time to open all N (each
// echoed one byte end to end), how many opened, the RSS of tpd and tp forward
// with all open, and the file descriptors each held.
//
// A tunnel holds one descriptor in each process: tp forward's local connection,
// tpd's connection to the destination (over TLS the tunnels are streams of a few
// tp-mux/1 connections, over QUIC of a few QUIC connections). A run asks for at
// most what RLIMIT_NOFILE's hard limit allows and says so.

// concurrencyTunnels is N: 10,000 in a full run, 2,000 in a quick one.
func concurrencyTunnels(sz sizes) int { return 10 * sz.tunnels }

// concurrencyInFlight bounds the dials in flight, as a burst of local clients would.
const concurrencyInFlight = 512

func concurrency(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "concurrency: tunnels open at once through one tp forward"
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return nil, err
	}
	echo, _, err := e.startHelper(ctx, "echo")
	if err != nil {
		return nil, err
	}
	var rows []Row
	for _, transport := range []string{"tls", "quic"} {
		n := concurrencyTunnels(sz)
		note := ""
		if uint64(n+200) > lim.Max {
			n = int(lim.Max - 200)
			note = fmt.Sprintf("asked %d, RLIMIT_NOFILE hard limit %d allows %d (1 fd per tunnel in each process)", concurrencyTunnels(sz), lim.Max, n)
		}
		open := Row{Scenario: scn, Variant: fmt.Sprintf("time to open %d", n), Transport: transport, Unit: "s", Note: note}
		okRow := Row{Scenario: scn, Variant: fmt.Sprintf("opened of %d", n), Transport: transport, Unit: "tunnels"}
		tpdRSS := Row{Scenario: scn, Variant: "tpd RSS, all open", Transport: transport, Unit: "MiB"}
		fwdRSS := Row{Scenario: scn, Variant: "tp forward RSS, all open", Transport: transport, Unit: "MiB"}
		tpdFD := Row{Scenario: scn, Variant: "tpd fds, all open", Transport: transport, Unit: "fds"}
		fwdFD := Row{Scenario: scn, Variant: "tp forward fds, all open", Transport: transport, Unit: "fds"}
		for r := range runs {
			err := func() error {
				t, err := e.startConcTPD(ctx, fmt.Sprintf("%s-%d", transport, r))
				if err != nil {
					return err
				}
				defer t.stop()
				args := []string{"forward", "--transport", transport, "127.0.0.1:0", echo}
				var addr string
				fwd, err := e.startProc(ctx, "tp forward", command(e.binary("tp"), args, []string{"TP_HOME=" + t.home}), true, time.Minute, func(line string) bool {
					if m := forwardRe.FindStringSubmatch(line); m != nil {
						addr = m[1]
						return true
					}
					return false
				})
				if err != nil {
					return err
				}
				defer fwd.stop()
				start := time.Now()
				conns, failed, firstErr := openConcurrent(addr, n)
				took := time.Since(start)
				defer closeAll(conns)
				time.Sleep(settle)
				ts, err1 := rssKiB(t.proc.pid())
				fs, err2 := rssKiB(fwd.pid())
				if err := errors.Join(err1, err2); err != nil {
					return err
				}
				open.Runs = append(open.Runs, took.Seconds())
				okRow.Runs = append(okRow.Runs, float64(n-failed))
				tpdRSS.Runs = append(tpdRSS.Runs, float64(ts)/1024)
				fwdRSS.Runs = append(fwdRSS.Runs, float64(fs)/1024)
				tpdFD.Runs = append(tpdFD.Runs, float64(fdCount(t.proc.pid())))
				fwdFD.Runs = append(fwdFD.Runs, float64(fdCount(fwd.pid())))
				e.log("  %s run %d: %d of %d open in %s; tpd %d MiB, tp forward %d MiB; first error: %v",
					transport, r+1, n-failed, n, took.Round(time.Millisecond), ts>>10, fs>>10, firstErr)
				if firstErr != nil {
					okRow.Note = firstLine(firstErr.Error())
					e.log("  tp forward said: %s", lastMatch(fwd.out.String(), "failed"))
					e.log("  tpd said: %s", lastMatch(t.proc.out.String(), "WARN"))
				}
				return nil
			}()
			if err != nil {
				open.Err = firstLine(err.Error())
				break
			}
		}
		rows = append(rows, open, okRow, tpdRSS, fwdRSS, tpdFD, fwdFD)
	}
	return rows, nil
}

// openConcurrent opens n tunnels to addr (an echo behind it), at most
// concurrencyInFlight dials at a time; each echoes one byte and then stays open.
func openConcurrent(addr string, n int) (conns []net.Conn, failed int, firstErr error) {
	conns = make([]net.Conn, n)
	var nfailed atomic.Int64
	var once sync.Once
	sem := make(chan struct{}, concurrencyInFlight)
	var wg sync.WaitGroup
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			err := func() error {
				c, err := net.DialTimeout("tcp", addr, 30*time.Second)
				if err != nil {
					return err
				}
				_ = c.SetDeadline(time.Now().Add(60 * time.Second))
				b := []byte{byte(i)}
				if _, err = c.Write(b); err == nil {
					_, err = io.ReadFull(c, b)
				}
				if err != nil {
					c.Close()
					return fmt.Errorf("tunnel %d: %w", i, err)
				}
				_ = c.SetDeadline(time.Time{})
				conns[i] = c
				return nil
			}()
			if err != nil {
				nfailed.Add(1)
				once.Do(func() { firstErr = err })
			}
		})
	}
	wg.Wait()
	return conns, int(nfailed.Load()), firstErr
}

// fdCount is how many file descriptors process pid holds (0 if unreadable).
func fdCount(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0
	}
	return len(ents)
}

// concTPD is a tpd of the concurrency scenario with its enrolled device.
type concTPD struct {
	proc *proc
	home string
}

func (t *concTPD) stop() { t.proc.stop() }

// startConcTPD starts a fresh tpd whose bounds let one device hold every tunnel
// (max-sessions-per-identity and max-conns lifted; quic-max-streams stays at its
// default, so QUIC runs on as many connections as tp needs) and enrolls a device.
func (e *Env) startConcTPD(ctx context.Context, label string) (*concTPD, error) {
	data := filepath.Join(e.dir, "conc-data-"+label)
	if _, err := runCmd(ctx, time.Minute, nil, e.binary("tpd"), "init", "--data-dir", data); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(data, "policy", "tp.rego"), []byte(benchPolicy), 0o600); err != nil {
		return nil, err
	}
	env := []string{"TP_MAX_SESSIONS_PER_IDENTITY=1000000", "TP_MAX_CONNS=1000000"}
	cmd := command(e.binary("tpd"), []string{"serve", "--data-dir", data, "--listen", "127.0.0.1:0"}, env)
	p, err := e.startProc(ctx, "tpd (concurrency)", cmd, false, time.Minute, func(line string) bool {
		return strings.HasPrefix(line, "CA fingerprint: ")
	})
	if err != nil {
		return nil, err
	}
	t := &concTPD{proc: p, home: filepath.Join(e.dir, "conc-home-"+label)}
	if err := e.enroll(ctx, data, "bench", "conc", "bench", t.home); err != nil {
		p.stop()
		return nil, err
	}
	return t, nil
}

// runEchoHelper is the echo destination of the concurrency scenario in a process
// of its own (its descriptors are not tpbench's).
func runEchoHelper(ctx context.Context, stdout io.Writer) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "ADDR %s\n", ln.Addr())
	stop := serve(ln, echoHandler)
	<-ctx.Done()
	stop()
	return nil
}

// lastMatch is the last line of out that contains substr.
func lastMatch(out, substr string) string {
	lines := strings.Split(out, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], substr) {
			return lines[i]
		}
	}
	return "(nothing)"
}
