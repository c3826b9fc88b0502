package e2e

import (
	"bufio"
	"context"
	"debug/buildinfo"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// bin holds the tpd, tp and dlogin binaries built once for the whole package;
// raceBin a tpd built with the race detector when this package is (the
// scenarios that mark themselves with raceTPD run it), bin's otherwise.
var bin, raceBin string

// raceTests holds the names of the tests that run the race-built tpd.
var raceTests sync.Map

// raceTPD makes t's tpd servers run under the race detector (when this
// package is built with it). The scenarios that mark themselves are those
// whose point is tpd's concurrency across processes: instances sharing a
// database and peering, rolling restarts, drains, reloads, kills. A race-built
// tpd in every test made this package take 759 CPU-seconds and 391 s on a
// quiet 2-core machine, against 527 and 277 s with it only in these (468 and
// 247 s with none); on a loaded machine that CPU set the length of the
// README's test command. tpd's code is under the detector in its own
// packages' tests as well (internal/server, proxy), in process.
func raceTPD(t *testing.T) {
	raceTests.Store(t.Name(), true)
}

// tpdServe is the tpd binary that serves for t: the race-built one for the
// scenarios marked with raceTPD.
func tpdServe(t testing.TB) string {
	name, _, _ := strings.Cut(t.Name(), "/")
	if _, ok := raceTests.Load(name); ok {
		return raceBin
	}
	return binary("tpd")
}

// defaultParallel is how many tests of this package run at once unless
// -parallel says otherwise. Each test mostly waits on processes (tpd, tp,
// sshd, PostgreSQL) starting, draining and reconnecting rather than using the
// CPU, so more tests than the default (GOMAXPROCS, 2 on a small CI machine)
// run at once; few enough that their processes do not starve each other of
// CPU on a loaded 2-core machine (where a starved tpd fails handshakes and
// drains for want of CPU, not of correctness).
const defaultParallel = 10

// slots bounds the tests running at once (-parallel) in place of testing's
// own bound, so that the long ones start first (parallelLong).
var slots *gate

// parallel is t.Parallel with this package's bound: at most -parallel tests
// run at once.
func parallel(t *testing.T) {
	t.Parallel()
	slots.enter(t, false)
}

// parallelLong is parallel for the few tests that take a minute or more even
// alone: when a slot frees, they get it before the others. Had they waited
// like the rest, the order in which the Go scheduler wakes the released tests
// would decide when they start, and one started last (as TestCarrierMatrix
// was) ended the package minutes after the others.
func parallelLong(t *testing.T) {
	t.Parallel()
	slots.enter(t, true)
}

// gate is a counting semaphore whose long waiters go first.
type gate struct {
	size        int
	mu          sync.Mutex
	free        int
	long, other []chan struct{} // waiting, in arrival order
}

// enter waits for a slot and gives it back when t ends (after its cleanups).
func (g *gate) enter(t *testing.T, long bool) {
	start := time.Now()
	g.mu.Lock()
	if g.free > 0 {
		g.free--
		g.mu.Unlock()
	} else {
		ch := make(chan struct{})
		if long {
			g.long = append(g.long, ch)
		} else {
			g.other = append(g.other, ch)
		}
		g.mu.Unlock()
		<-ch
		t.Logf("started after %s waiting for one of %d slots (-parallel)", time.Since(start).Round(time.Millisecond), g.size)
	}
	t.Cleanup(g.leave)
}

func (g *gate) leave() {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case len(g.long) > 0:
		close(g.long[0])
		g.long = g.long[1:]
	case len(g.other) > 0:
		close(g.other[0])
		g.other = g.other[1:]
	default:
		g.free++
	}
}

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		// Nothing here is cheap: go test -short runs without them.
		fmt.Println("skipped under -short: every test here runs TP's binaries (built first), and most also sshd, Chromium, PostgreSQL or network namespaces")
		os.Exit(0)
	}
	n := defaultParallel
	flag.Visit(func(f *flag.Flag) {
		if f.Name == "test.parallel" {
			n, _ = strconv.Atoi(f.Value.String())
		}
	})
	slots = &gate{size: max(n, 1), free: max(n, 1)}
	// testing's own bound would hold the long tests back with the rest;
	// slots is the bound now (parallel subtests run as their test decides).
	flag.Set("test.parallel", "1000")
	dir, err := os.MkdirTemp("", "tp-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// TP.js's terminal page loads the SSH client as WebAssembly and
	// xterm.js, which tpd embeds when they are built first.
	web := exec.Command("bash", filepath.Join("..", "..", "..", "deploy", "build-web.sh"))
	web.Stdout, web.Stderr = os.Stderr, os.Stderr
	if err := web.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building TP.js's terminal (deploy/build-web.sh) failed:", err)
		os.Exit(1)
	}
	// tpd runs under the race detector, when this package does, in the
	// scenarios whose point is its concurrency across processes (raceTPD).
	// tp, dlogin and every other tpd are built as deploy/build.sh releases
	// them (CGO_ENABLED=0, -trimpath, no detector), so the tests run the
	// programs people run, and the release build in deploy's tests reuses
	// their compiled packages on a fresh machine; the clients' concurrency is
	// under the detector in the clients packages' own tests. Race-built, tp
	// and dlogin cost this package a third of its CPU (325 s of 900 in one
	// run) and showed no race of their own.
	raceBin = filepath.Join(dir, "race", "tpd")
	release := []string{"github.com/tp-proxy/tp/cmd/tpd", "github.com/tp-proxy/tp/cmd/tp", "github.com/tp-proxy/tp/cmd/dlogin"}
	builds := []struct {
		out   string
		flags []string
		env   string
		pkgs  []string
	}{
		{dir, []string{"-trimpath"}, "CGO_ENABLED=0", release},
		{filepath.Dir(raceBin), raceFlags, "", []string{"github.com/tp-proxy/tp/cmd/tpd"}},
	}
	if raceFlags == nil {
		raceBin = filepath.Join(dir, "tpd")
		builds = builds[:1]
	}
	for _, b := range builds {
		args := append([]string{"build", "-o", b.out + string(os.PathSeparator)}, b.flags...)
		cmd := exec.Command("go", append(args, b.pkgs...)...)
		if b.env != "" {
			cmd.Env = append(os.Environ(), b.env)
		}
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s failed: %v\n", strings.Join(b.pkgs, " "), err)
			os.Exit(1)
		}
	}
	bin = dir
	// Every tpd here drains for 10 s at most (the default is 30 s): the harness
	// waits 15 s for a stopped tpd, and the abort tests' long transfers are made
	// to outlast 10 s.
	if os.Getenv("TP_SHUTDOWN_TIMEOUT") == "" {
		os.Setenv("TP_SHUTDOWN_TIMEOUT", "10s")
	}
	// A race-instrumented program that returns from main sleeps a second
	// (the race detector's atexit_sleep_ms) so that goroutines still running
	// can report races. Every tpd, tp and dlogin here is one, and the tests
	// run hundreds of short ones (tpd enroll, dlogin, tp HOST PORT): that
	// second was most of their time. A race is still reported when the
	// detector sees it; only one in a goroutine that outlives main goes unseen.
	if g := os.Getenv("GORACE"); !strings.Contains(g, "atexit_sleep_ms") {
		os.Setenv("GORACE", strings.TrimSpace(g+" atexit_sleep_ms=0"))
	}
	code := testpg.Main(m) // m.Run, then the PostgreSQL server a test started stops
	os.RemoveAll(dir)
	os.Exit(code)
}

func binary(name string) string { return filepath.Join(bin, name) }

// command is exec.Command for a process the tests run (tpd, tp, sshd, ...):
// the kernel kills it when the test binary ends, so that a binary ended past
// its cleanups (a test's timeout panics) leaves no process behind. The
// signal follows the thread that started the process, and this package ends
// none of its threads (inNS).
func command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// commandContext is command with exec.CommandContext's bound.
func commandContext(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// server is a running `tpd serve` process.
type server struct {
	DataDir     string
	Addr        string
	URL         string
	Fingerprint string
	log         *testlog.Buffer // its standard error
	cmd         *exec.Cmd
	done        chan struct{} // closed when it has exited
	// mustStop makes a tpd that outlives SIGTERM by 15s at the test's end a
	// failure; a fault test's tpd, which the test may have crashed, is only ended.
	mustStop bool
}

// startServer initialises a data dir, installs policy (replacing the default
// policy when not empty) and runs `tpd serve` on a free loopback port; env
// (TP_... settings) goes to tpd init and tpd serve.
func startServer(t testing.TB, policy string, env ...string) *server {
	t.Helper()
	s := startTPD(t, initTPD(t, policy, env...), "127.0.0.1:0", env)
	s.mustStop = true
	return s
}

// startStableServer is startServer on stableAddr, for a test that starts tpd
// again on the same port.
func startStableServer(t testing.TB, policy string, env ...string) *server {
	t.Helper()
	s := startTPD(t, initTPD(t, policy, env...), stableAddr(t), env)
	s.mustStop = true
	return s
}

// stableAddr is a loopback address whose port, free on TCP and UDP, lies below
// the kernel's ephemeral range: for a tpd whose test checks that new
// connections are refused once it stops, or starts another tpd on its port. A
// ":0" port goes back to the next ":0" bind anywhere on the machine as soon
// as tpd lets it go, and under load one took it: its socket answered the
// check (a reset, not a refusal).
func stableAddr(t testing.TB) string {
	return testnet.FreeAddr(t, "tcp+udp").String()
}

// initTPD makes a data dir whose only policy file is policy (when not empty;
// else the default policy stays); env goes to tpd init.
func initTPD(t testing.TB, policy string, env ...string) string {
	t.Helper()
	dataDir := filepath.Join(t.TempDir(), "tpdata")
	run(t, env, binary("tpd"), "init", "--data-dir", dataDir)
	if policy != "" {
		if err := os.WriteFile(filepath.Join(dataDir, "policy", "tp.rego"), []byte(policy), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dataDir
}

// startTPD runs `tpd serve` on dataDir and listen ("127.0.0.1:0" picks a port,
// which s.Addr then holds; a test may SIGKILL a tpd and start another on the
// same address and data dir) and waits until it is ready.
func startTPD(t testing.TB, dataDir, listen string, env []string) *server {
	t.Helper()
	s := &server{DataDir: dataDir, log: &testlog.Buffer{}, done: make(chan struct{})}
	s.cmd = command(tpdServe(t), "serve", "--data-dir", dataDir, "--listen", listen)
	s.cmd.Env = append(os.Environ(), env...)
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr = s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(15 * time.Second):
			s.cmd.Process.Kill()
			<-s.done
			if s.mustStop {
				t.Errorf("tpd did not stop within 15s of SIGTERM")
			}
		}
		if t.Failed() {
			t.Logf("tpd log:\n%s", s.log.String())
		}
	})
	ready := make(chan error, 1)
	go func() {
		defer close(s.done)
		sc := bufio.NewScanner(stdout)
		listening := regexp.MustCompile(`listening on (\S+) \((\S+)\)`)
		for sc.Scan() {
			line := sc.Text()
			if m := listening.FindStringSubmatch(line); m != nil {
				s.Addr, s.URL = m[1], m[2]
			}
			if fp, ok := strings.CutPrefix(line, "CA fingerprint: "); ok {
				s.Fingerprint = fp
				ready <- nil
			}
		}
		ready <- fmt.Errorf("tpd exited before it was ready: %v", s.cmd.Wait())
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("%v\n%s", err, s.log.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("tpd did not start within 60s\n%s", s.log.String())
	}
	return s
}

// kill ends tpd with SIGKILL: no shutdown, no unregistering, nothing saved.
func (s *server) kill(t *testing.T) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		t.Fatal("tpd still runs 15s after SIGKILL")
	}
}

// enroll returns the arguments of the dlogin line `tpd enroll` printed.
func (s *server) enroll(t testing.TB, user, device string, groups ...string) []string {
	t.Helper()
	args := []string{"enroll", user, "--device", device, "--data-dir", s.DataDir}
	if len(groups) > 0 {
		args = append(args, "--groups", strings.Join(groups, ","))
	}
	out := run(t, nil, binary("tpd"), args...)
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "dlogin ") {
			return strings.Fields(line)[1:]
		}
	}
	t.Fatalf("tpd enroll printed no line starting with \"dlogin \":\n%s", out)
	return nil
}

// login enrolls user@device and runs the real dlogin in a fresh TP_HOME.
func (s *server) login(t testing.TB, user, device string, groups ...string) []string {
	t.Helper()
	env := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "tp-home")}
	out := run(t, env, binary("dlogin"), s.enroll(t, user, device, groups...)...)
	if !strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin did not report success:\n%s", out)
	}
	return env
}

// run executes a command that must succeed and returns its combined output.
func run(t testing.TB, env []string, name string, args ...string) string {
	t.Helper()
	out, err := runErr(env, nil, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return out
}

// runErr executes a command with a 2-minute bound and returns its combined output.
func runErr(env []string, stdin io.Reader, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := commandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = stdin
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// waitTCP polls until addr accepts connections.
func waitTCP(t *testing.T, addr string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not accept connections within %s: %v", addr, within, err)
		}
		time.Sleep(20 * time.Millisecond) // polling for readiness, bounded by the deadline above
	}
}

// The scenarios marked with raceTPD serve with the race-built tpd (when this
// package is built with the detector), their subtests too; the others with
// the release build.
func TestRaceTPDServes(t *testing.T) {
	plain := tpdServe(t)
	raceTPD(t)
	t.Run("sub", func(t *testing.T) {
		if got := tpdServe(t); got != raceBin {
			t.Fatalf("a marked test's subtest serves with %s; want %s", got, raceBin)
		}
	})
	if plain != binary("tpd") {
		t.Fatalf("an unmarked test serves with %s; want %s", plain, binary("tpd"))
	}
	for path, race := range map[string]bool{plain: false, raceBin: raceFlags != nil} {
		info, err := buildinfo.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		got := false
		for _, s := range info.Settings {
			got = got || (s.Key == "-race" && s.Value == "true")
		}
		if got != race {
			t.Fatalf("%s built with -race %v; want %v", path, got, race)
		}
	}
}
