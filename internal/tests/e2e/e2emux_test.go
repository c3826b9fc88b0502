package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"os"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// runForward runs `tp forward 127.0.0.1:0 target` and returns its local address
// and a stop that ends it (SIGINT, then SIGKILL after 10 s).
func runForward(t *testing.T, env []string, target string) (addr string, log *testlog.Buffer, stop func()) {
	t.Helper()
	cmd := command(binary("tp"), "forward", "127.0.0.1:0", target)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	log = &testlog.Buffer{}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = cmd.Process.Signal(os.Interrupt)
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-done
			}
		})
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("tp forward log:\n%s", log.String())
		}
	})
	addrs := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		re := regexp.MustCompile(`^Forwarding (\S+) to`)
		for sc.Scan() {
			log.Write([]byte(sc.Text() + "\n"))
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				addrs <- m[1]
			}
		}
		close(addrs)
	}()
	select {
	case a, ok := <-addrs:
		if !ok {
			t.Fatalf("tp forward exited:\n%s", log.String())
		}
		return a, log, stop
	case <-time.After(30 * time.Second):
		t.Fatalf("tp forward did not start within 30s:\n%s", log.String())
	}
	return "", nil, nil
}

// echoChecksummed sends size random bytes through addr (an echo behind TP)
// and checks that the same bytes come back, then a clean end.
func echoChecksummed(addr string, size int) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	data := make([]byte, size)
	_, _ = rand.Read(data)
	want := sha256.Sum256(data)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		return err
	}
	if err := <-werr; err != nil {
		return err
	}
	if n != int64(size) || !bytes.Equal(h.Sum(nil), want[:]) {
		return errors.New("the echo differs from what was sent")
	}
	return nil
}

// countLines counts the lines of log that contain every one of parts.
func countLines(log string, parts ...string) int {
	n := 0
	for line := range strings.Lines(log) {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			n++
		}
	}
	return n
}

// TestE2EMuxOneDialManySessions: bob's `tp forward` to alice's protected name
// carries 40 sessions (20 one after another, 20 at once; 256 KiB each way,
// checksummed) as streams of one end-to-end carrier, over QUIC and over TLS:
// tpd logs exactly one session to the name for each transport (the carrier),
// and the agent logs each stream, as a session of its own, with bob's
// identity.
func TestE2EMuxOneDialManySessions(t *testing.T) {
	parallel(t)
	srv := startServer(t, reversePolicy)
	alice := srv.login(t, "alice", "laptop")
	bob := srv.login(t, "bob", "phone")
	echo := testnet.Echo(t)
	for _, transport := range []string{"quic", "tls"} {
		t.Run(transport, func(t *testing.T) {
			tr := "TP_TRANSPORT=" + transport
			before := countLines(srv.log.String(), "proxy session", "dest=laptop-ssh.rev.tp.internal:22")
			agentLog := startExpose(t, append(alice, tr), "laptop-ssh", echo, "--allow-user", "bob")
			addr, _, stop := runForward(t, append(bob, tr), "laptop-ssh.rev.tp.internal:22")
			for i := range 20 {
				if err := echoChecksummed(addr, 256<<10); err != nil {
					t.Fatalf("session %d: %v", i, err)
				}
			}
			var wg sync.WaitGroup
			errs := make(chan error, 20)
			for range 20 {
				wg.Add(1)
				go func() { defer wg.Done(); errs <- echoChecksummed(addr, 256<<10) }()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, 20*time.Second, "the agent's 40 stream lines", func() bool {
				return countLines(agentLog.String(), "tp expose: session", "e2e=mux", "bob@phone") == 40
			})
			stop() // the carrier ends with tp forward: tpd logs its session
			waitFor(t, 20*time.Second, "tpd's line for the carrier", func() bool {
				return countLines(srv.log.String(), "proxy session", "dest=laptop-ssh.rev.tp.internal:22") > before
			})
			if n := countLines(srv.log.String(), "proxy session", "dest=laptop-ssh.rev.tp.internal:22") - before; n != 1 {
				t.Fatalf("tpd logged %d sessions to the name for 40 sessions; want 1 (the carrier)", n)
			}
		})
	}
}

// TestE2EMuxRevokedDialerIsCut: when tpd revokes the dialer, the carrier's
// session is cut, and a session open on it ends for bob's local client with a
// reset, never a clean end.
func TestE2EMuxRevokedDialerIsCut(t *testing.T) {
	parallel(t)
	for _, transport := range []string{"quic", "tls"} {
		t.Run(transport, func(t *testing.T) {
			srv := startServer(t, reversePolicy)
			tr := "TP_TRANSPORT=" + transport
			alice := append(srv.login(t, "alice", "laptop"), tr)
			bob := append(srv.login(t, "bob", "phone"), tr)
			startExpose(t, alice, "laptop-ssh", testnet.Echo(t), "--allow-user", "bob")
			addr, _, _ := runForward(t, bob, "laptop-ssh.rev.tp.internal:22")
			if err := echoChecksummed(addr, 1024); err != nil { // opens the carrier
				t.Fatal(err)
			}
			c, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			if _, err := c.Write([]byte("open")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
				t.Fatal(err)
			}
			run(t, nil, binary("tpd"), "revoke", "--device", "bob@phone", "--data-dir", srv.DataDir)
			_, err = io.Copy(io.Discard, c)
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("a session on the carrier of a revoked dialer ended with %v; want a reset", err)
			}
		})
	}
}
