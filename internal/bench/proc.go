package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// tail keeps the last bytes a process wrote, for error messages.
type tail struct {
	mu sync.Mutex
	b  []byte
}

const tailSize = 16 << 10

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > 2*tailSize {
		t.b = append(t.b[:0], t.b[len(t.b)-tailSize:]...)
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.b) > tailSize {
		return "…" + string(t.b[len(t.b)-tailSize:])
	}
	return string(t.b)
}

// proc is a long-running child process that the Env stops at the end.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *tail
	done chan struct{}
	err  error // valid once done is closed
}

// command prepares a child that dies with tpbench (Pdeathsig) and gets env on top
// of tpbench's environment.
func command(name string, args []string, env []string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// startProc starts a child and scans its stdout (or stderr when fromStderr) line
// by line until match returns true for a line, bounded by within. Output beyond
// that goes to the process's tail buffer.
func (e *Env) startProc(ctx context.Context, label string, cmd *exec.Cmd, fromStderr bool, within time.Duration, match func(line string) bool) (*proc, error) {
	p := &proc{name: label, cmd: cmd, out: &tail{}, done: make(chan struct{})}
	var pipe io.ReadCloser
	var err error
	if fromStderr {
		cmd.Stdout = p.out
		pipe, err = cmd.StderrPipe()
	} else {
		if cmd.Stderr == nil { // a caller that reads stderr itself set it
			cmd.Stderr = p.out
		}
		pipe, err = cmd.StdoutPipe()
	}
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", label, err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pipe)
		matched := false
		for sc.Scan() {
			line := sc.Text()
			p.out.Write([]byte(line + "\n"))
			if !matched && match(line) {
				matched = true
				close(ready)
			}
		}
		io.Copy(p.out, pipe)
		p.err = cmd.Wait()
		close(p.done)
	}()
	t := time.NewTimer(within)
	defer t.Stop()
	select {
	case <-ready:
		return p, nil
	case <-p.done:
		return nil, fmt.Errorf("%s exited before it was ready (%v):\n%s", label, p.err, p.out.String())
	case <-t.C:
		p.stop()
		return nil, fmt.Errorf("%s was not ready within %s:\n%s", label, within, p.out.String())
	case <-ctx.Done():
		p.stop()
		return nil, ctx.Err()
	}
}

// stop asks politely (SIGTERM), then kills after 5 seconds. Idempotent.
func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// runCmd runs a command to completion with a bound and returns its combined output.
func runCmd(ctx context.Context, within time.Duration, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	b, err := cmd.CombinedOutput()
	if err != nil {
		return string(b), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, b)
	}
	return string(b), nil
}

var addrRe = regexp.MustCompile(`^ADDR (\S+)$`)

// cpuTicks is utime+stime of pid in clock ticks (USER_HZ, 100 on Linux).
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("unexpected /proc stat format")
	}
	f := strings.Fields(s[i+1:])
	// After the command name: state is field 3, utime 14, stime 15 (1-based).
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return u + st, nil
}

const ticksPerSecond = 100

// rssKiB is VmRSS of pid.
func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) >= 1 {
				return strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	return 0, errors.New("no VmRSS")
}
