package e2e

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
)

const reversePolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user == "alice"
	input.destination.reverse == "laptop-ssh"
}

allow if {
	input.action == "dial"
	input.destination.reverse == "laptop-ssh"
	input.identity.user == "bob"
}

reason := sprintf("%s may not reach %s", [input.identity.device_id, input.destination.host]) if not allow
`

// startExpose runs `tp expose` and waits for its "Exposing" line.
func startExpose(t *testing.T, env []string, args ...string) *testlog.Buffer {
	t.Helper()
	cmd := command(binary("tp"), append([]string{"expose"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	log := &testlog.Buffer{}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Errorf("tp expose did not stop within 10s of Ctrl-C")
		}
		if t.Failed() {
			t.Logf("tp expose log:\n%s", log.String())
		}
	})
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sent := false
		for sc.Scan() {
			log.Write([]byte(sc.Text() + "\n"))
			if !sent && strings.HasPrefix(sc.Text(), "Exposing ") {
				sent = true
				ready <- true
			}
		}
		if !sent {
			ready <- false
		}
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("tp expose exited:\n%s", log.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("tp expose did not register within 60s:\n%s", log.String())
	}
	return log
}

// Alice exposes a real sshd with `tp expose`; Bob runs the real ssh through
// ProxyCommand="tp %h %p" to the reverse name and runs a command; Carol is
// refused with the policy's reason — over QUIC and over TLS.
func TestReverseSSH(t *testing.T) {
	parallel(t)
	srv := startServer(t, reversePolicy)
	sd := startSSHD(t)
	alice := srv.login(t, "alice", "laptop")
	bob := srv.login(t, "bob", "phone")
	carol := srv.login(t, "carol", "pc")
	for _, transport := range []string{"quic", "tls"} {
		t.Run(transport, func(t *testing.T) {
			tr := "TP_TRANSPORT=" + transport
			startExpose(t, append(alice, tr), "laptop-ssh", "127.0.0.1:"+strconv.Itoa(sd.Port), "--allow-user", "bob")
			stdout, stderr, err := sd.ssh(t, append(bob, tr), "laptop-ssh.rev.tp.internal", "echo hello-$((6*7))")
			if err != nil || strings.TrimSpace(stdout) != "hello-42" {
				t.Fatalf("bob's ssh: %v, stdout %q\nstderr:\n%s", err, stdout, stderr)
			}
			_, stderr, err = sd.ssh(t, append(carol, tr), "laptop-ssh.rev.tp.internal", "true")
			if err == nil || !strings.Contains(stderr, "tp: denied by policy: carol@pc may not reach laptop-ssh.rev.tp.internal") {
				t.Fatalf("carol's ssh: %v\nstderr:\n%s", err, stderr)
			}
		})
	}
}
