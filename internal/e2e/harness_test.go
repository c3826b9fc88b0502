package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// bin holds the tpd, tp and dlogin binaries built once for the whole package.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tp-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	args := []string{"build", "-o", dir + string(os.PathSeparator)}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "github.com/tp-proxy/tp/cmd/tpd", "github.com/tp-proxy/tp/cmd/tp", "github.com/tp-proxy/tp/cmd/dlogin")
	cmd := exec.Command("go", args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building the binaries failed:", err)
		os.Exit(1)
	}
	bin = dir
	// Every tpd here drains for 10 s at most (the default is 30 s): the harness
	// waits 15 s for a stopped tpd, and the abort tests' long transfers are made
	// to outlast 10 s.
	if os.Getenv("TP_SHUTDOWN_TIMEOUT") == "" {
		os.Setenv("TP_SHUTDOWN_TIMEOUT", "10s")
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func binary(name string) string { return filepath.Join(bin, name) }

// syncBuffer collects a process's output for assertions and failure messages.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// server is a running tpd binary.
type server struct {
	DataDir     string
	Addr        string
	URL         string
	Fingerprint string
	log         *syncBuffer
}

// startServer initialises a data dir, installs policy (replacing the default
// policy when not empty) and runs `tpd serve` on a free loopback port.
func startServer(t *testing.T, policy string) *server {
	t.Helper()
	s := &server{DataDir: filepath.Join(t.TempDir(), "tpdata"), log: &syncBuffer{}}
	run(t, nil, binary("tpd"), "init", "--data-dir", s.DataDir)
	if policy != "" {
		if err := os.WriteFile(filepath.Join(s.DataDir, "policy", "tp.rego"), []byte(policy), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(binary("tpd"), "serve", "--data-dir", s.DataDir, "--listen", "127.0.0.1:0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = s.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Errorf("tpd did not stop within 15s of SIGTERM")
		}
		if t.Failed() {
			t.Logf("tpd log:\n%s", s.log.String())
		}
	})
	ready := make(chan error, 1)
	go func() {
		defer close(done)
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
		ready <- fmt.Errorf("tpd exited before it was ready: %v", cmd.Wait())
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

// enroll returns the arguments of the dlogin line `tpd enroll` printed.
func (s *server) enroll(t *testing.T, user, device string, groups ...string) []string {
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
func (s *server) login(t *testing.T, user, device string, groups ...string) []string {
	t.Helper()
	env := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "tp-home")}
	out := run(t, env, binary("dlogin"), s.enroll(t, user, device, groups...)...)
	if !strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin did not report success:\n%s", out)
	}
	return env
}

// run executes a command that must succeed and returns its combined output.
func run(t *testing.T, env []string, name string, args ...string) string {
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
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = stdin
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
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
