package e2e

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// TestProxyCommandStdoutBroken: ssh goes away while the destination is still
// sending. Bad input: tp's standard output breaks (its reader closes the pipe).
// tp must not die of SIGPIPE without a word, leaving the session to time out on
// the far side: it exits 1 saying that standard output failed, and the
// destination sees its session end, over TLS and QUIC.
func TestProxyCommandStdoutBroken(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)
	env := srv.login(t, "alice", "laptop")
	for _, tr := range []string{clients.TransportTLS, clients.TransportQUIC} {
		t.Run(tr, func(t *testing.T) {
			ended := make(chan struct{}, 1)
			addr := testnet.Serve(t, func(c *net.TCPConn) {
				testnet.WriteForever(c) // until the session is ended
				ended <- struct{}{}
			})
			_, port, _ := net.SplitHostPort(addr)
			cmd := command(binary("tp"), "127.0.0.1", port)
			cmd.Env = append(os.Environ(), append(env, "TP_TRANSPORT="+tr)...)
			stderr := &testlog.Buffer{}
			cmd.Stderr = stderr
			stdinR, stdinW, err := os.Pipe() // kept open: ssh's side of tp's input
			if err != nil {
				t.Fatal(err)
			}
			defer stdinW.Close()
			stdoutR, stdoutW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stdin, cmd.Stdout = stdinR, stdoutW
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			stdinR.Close()
			stdoutW.Close()
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			defer cmd.Process.Kill()

			// Read the first 256 KiB, then go away like a killed ssh.
			if err := stdoutR.SetReadDeadline(time.Now().Add(60 * time.Second)); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 32<<10)
			for read := 0; read < 256<<10; {
				n, err := stdoutR.Read(buf)
				if err != nil {
					t.Fatalf("reading tp's output after %d bytes: %v\n%s", read, err, stderr.String())
				}
				read += n
			}
			stdoutR.Close()

			select {
			case err := <-done:
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.ExitCode() != 1 {
					t.Fatalf("tp ended with %v, want exit status 1 (not a signal)\n%s", err, stderr.String())
				}
			case <-time.After(60 * time.Second):
				t.Fatalf("tp still runs 60s after its standard output broke\n%s", stderr.String())
			}
			if !strings.Contains(stderr.String(), "standard output") {
				t.Fatalf("tp's error does not say its standard output failed:\n%s", stderr.String())
			}
			// tp reset the session, so the destination's writes fail well before
			// tpd's QUIC idle timeout would have noticed a vanished tp.
			select {
			case <-ended:
			case <-time.After(30 * time.Second):
				t.Fatalf("the destination still sends 30s after tp exited")
			}
		})
	}
}
