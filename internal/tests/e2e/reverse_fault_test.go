package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testcut"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// faultPolicy: alice and mallory may register names, alice may expose TCP port
// %[1]d publicly, bob may reach every reverse name.
const faultPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user in {"alice", "mallory"}
}

allow if {
	input.action == "expose_public"
	input.identity.user == "alice"
	input.destination.port == %[1]d
}

allow if {
	input.action == "dial"
	input.destination.reverse != ""
	input.identity.user == "bob"
}
`

// agentProc is a `tp expose` process whose registrations the test follows.
type agentProc struct {
	cmd        *exec.Cmd
	log        *testlog.Buffer
	registered chan struct{} // one per "Exposing" line group
	exited     chan struct{}
}

func startAgentProc(t *testing.T, env []string, args ...string) *agentProc {
	t.Helper()
	a := &agentProc{log: &testlog.Buffer{}, registered: make(chan struct{}, 100), exited: make(chan struct{})}
	a.cmd = command(binary("tp"), append([]string{"expose"}, args...)...)
	a.cmd.Env = append(os.Environ(), env...)
	stderr, err := a.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			a.log.Write([]byte(sc.Text() + "\n"))
			if strings.HasPrefix(sc.Text(), "Exposing ") {
				a.registered <- struct{}{}
			}
		}
		a.cmd.Wait()
		close(a.exited)
	}()
	t.Cleanup(func() {
		a.cmd.Process.Signal(syscall.SIGCONT)
		a.cmd.Process.Signal(os.Interrupt)
		select {
		case <-a.exited:
		case <-time.After(10 * time.Second):
			a.cmd.Process.Kill()
			<-a.exited
		}
		if t.Failed() {
			t.Logf("tp expose %s log:\n%s", args[0], a.log.String())
		}
	})
	return a
}

// waitRegistered waits for the next registration, or for the agent to exit.
func (a *agentProc) waitRegistered(t *testing.T) {
	t.Helper()
	select {
	case <-a.registered:
	case <-a.exited:
		t.Fatalf("tp expose exited:\n%s", a.log.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("tp expose did not register within 60s:\n%s", a.log.String())
	}
}

// waitExit waits for the agent to exit and returns its log.
func (a *agentProc) waitExit(t *testing.T) string {
	t.Helper()
	select {
	case <-a.exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("tp expose did not exit within 60s:\n%s", a.log.String())
	}
	return a.log.String()
}

// clientFor opens the TP client state that dlogin left in env's TP_HOME.
func clientFor(t *testing.T, env []string) *clients.Client {
	t.Helper()
	for _, e := range env {
		if dir, ok := strings.CutPrefix(e, "TP_HOME="); ok {
			c, err := clients.Open(clients.Home{Dir: dir})
			if err != nil {
				t.Fatal(err)
			}
			return c
		}
	}
	t.Fatal("no TP_HOME in env")
	return nil
}

// dialName opens a session to a reverse name as c, over TLS.
func dialName(t *testing.T, c *clients.Client, name string) (net.Conn, error) {
	t.Helper()
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	d.Transport = clients.TransportTLS
	t.Cleanup(func() { d.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return d.DialContext(ctx, "tcp", name+":22")
}

func echoOnce(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// tpd is killed with SIGKILL while a session runs and started again: the session
// ends with an error for the dialer (not a clean end), the name stays alice's
// through the gap (mallory, trying while alice's agent has not come back, is
// refused), alice's agent comes back by itself, and new sessions work.
func TestReverseTPDKilledAndRestarted(t *testing.T) {
	parallel(t)
	raceTPD(t)
	dataDir := initTPD(t, fmt.Sprintf(faultPolicy, 1))
	srv := startTPD(t, dataDir, stableAddr(t), nil) // started again on its port below
	alice := append(srv.login(t, "alice", "laptop"), "TP_TRANSPORT=tls")
	bob := clientFor(t, srv.login(t, "bob", "phone"))
	mallory := append(srv.login(t, "mallory", "pc"), "TP_TRANSPORT=tls")

	agent := startAgentProc(t, alice, "laptop-ssh", testnet.Echo(t), "--allow-user", "bob")
	agent.waitRegistered(t)
	sess, err := dialName(t, bob, "laptop-ssh.rev.tp.internal")
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	if err := echoOnce(sess, "before the crash"); err != nil {
		t.Fatal(err)
	}

	// Freeze alice's agent so that the gap after the restart is certain to be
	// one in which she has not come back yet.
	if err := agent.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	srv.kill(t)
	_, err = io.ReadAll(sess)
	testcut.Check(t, "the running session, when tpd was killed,", err)

	startTPD(t, dataDir, srv.Addr, nil) // same address and data dir, after a SIGKILL
	out, err := runErr(mallory, nil, binary("tp"), "expose", "laptop-ssh", "127.0.0.1:1", "--allow-user", "mallory")
	if err == nil || !strings.Contains(out, "name taken: laptop-ssh.rev.tp.internal belongs to another identity, whose agent is reconnecting") {
		t.Fatalf("mallory in the gap: %v\n%s", err, out)
	}
	if err := agent.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	agent.waitRegistered(t) // the agent came back by itself
	sess2, err := dialName(t, bob, "laptop-ssh.rev.tp.internal")
	if err != nil {
		t.Fatalf("a new session after the restart: %v", err)
	}
	defer sess2.Close()
	if err := echoOnce(sess2, "after the restart"); err != nil {
		t.Fatal(err)
	}
}

// The agent process is killed with SIGKILL mid-transfer: the public client sees a
// TCP reset and the protected dialer an error, never a silent short read.
func TestReverseAgentKilledMidTransfer(t *testing.T) {
	parallel(t)
	raceTPD(t)
	port := testnet.FreePort(t, "tcp")
	dataDir := initTPD(t, fmt.Sprintf(faultPolicy, port))
	srv := startTPD(t, dataDir, "127.0.0.1:0", []string{"TP_PUBLIC_PORTS=" + strconv.Itoa(port)})
	alice := append(srv.login(t, "alice", "laptop"), "TP_TRANSPORT=tls")
	bob := clientFor(t, srv.login(t, "bob", "phone"))
	stream := testnet.Stream(t)
	agent := startAgentProc(t, alice, "stream", stream, "--public", strconv.Itoa(port),
		"--also", "prot="+stream, "--allow-user", "bob")
	agent.waitRegistered(t)

	public, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer public.Close()
	prot, err := dialName(t, bob, "prot.rev.tp.internal")
	if err != nil {
		t.Fatal(err)
	}
	defer prot.Close()
	for _, c := range []net.Conn{public, prot} {
		c.SetDeadline(time.Now().Add(60 * time.Second))
		if _, err := io.CopyN(io.Discard, c, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := agent.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	agent.waitExit(t)
	_, err = io.Copy(io.Discard, public)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("public client after the agent died: %v; want a connection reset", err)
	}
	_, err = io.Copy(io.Discard, prot)
	testcut.Check(t, "the protected dialer, after the agent died,", err)
}
