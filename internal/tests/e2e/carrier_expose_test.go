package e2e

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// TestExposeAutoUDPDroppedInNamespace: `tp expose` with transport auto (the
// default) on a client host whose network drops every UDP datagram
// (iptables in its namespace) races QUIC over UDP against the stream
// carriers, as tp and tp forward do: it registers over the tls carrier,
// remembers tls for this server on this network (the transport cache's key
// names the network), and bob, on the TP host, reaches the exposed service.
// Started again, tp expose goes straight to the remembered carrier, without
// waiting for UDP. Bad input: the dropped UDP itself; and a carrier that the
// network also blocks (every direct TCP connection to tpd dropped, no proxy):
// tp expose says it cannot connect and keeps retrying, and registers no name.
func TestExposeAutoUDPDroppedInNamespace(t *testing.T) {
	parallel(t)
	n := newCarrierNetWith(t, carrierMatrixPolicy)
	n.blockInC(t, true, false)
	var echo string
	inNS(t, n.C, func() { echo = testnet.Echo(t) })

	bob := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "bob-home")}
	out, err := runErr(bob, nil, "ip", append([]string{"netns", "exec", n.T, binary("dlogin")}, n.tpd.enroll(t, "bob", "phone")...)...)
	if err != nil || !strings.Contains(out, "Login successful!") {
		t.Fatalf("bob's dlogin: %v\n%s", err, out)
	}
	bobDials := func(msg string) {
		t.Helper()
		out, err := runErr(bob, strings.NewReader(msg), "ip", "netns", "exec", n.T, binary("tp"), "--timeout", "60s", "udpless.rev.tp.internal", "22")
		if err != nil || !strings.Contains(out, msg) {
			t.Fatalf("bob's tp to the exposed name: %v\n%s", err, out)
		}
	}

	log, stop := startExposeIn(t, n.C, n.env, "udpless", echo, "--allow-user", "bob")
	if !strings.Contains(log.String(), "no answer over UDP in time; connected over the tls carrier") {
		t.Fatalf("tp expose did not say it fell back from UDP to the tls carrier:\n%s", log.String())
	}
	carrier, key := n.rememberedCarrier(t)
	if carrier != "tls" || !strings.Contains(key, " on ") {
		t.Fatalf("remembered %q under %q; want the tls carrier, under a key naming the network", carrier, key)
	}
	bobDials("ping over the tls carrier")
	stop()

	// Started again on the same network: the remembered carrier, at once.
	log, stop = startExposeIn(t, n.C, n.env, "udpless", echo, "--allow-user", "bob")
	if !strings.Contains(log.String(), "connected over the tls carrier, remembered for this network") || strings.Contains(log.String(), "no answer over UDP") {
		t.Fatalf("tp expose, started again, did not start on the remembered tls carrier:\n%s", log.String())
	}
	bobDials("ping again")
	stop()

	// Bad input: the network now drops tpd's TCP ports too (and no proxy):
	// nothing gets through; tp expose says so and registers nothing.
	n.blockInC(t, false, true)
	cmd, log := exposeCmdIn(n.C, n.env, "--timeout", "5s", "udpless", echo, "--allow-user", "bob")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	deadline := time.Now().Add(90 * time.Second)
	for !strings.Contains(log.String(), "cannot reach the TP server") {
		if time.Now().After(deadline) {
			t.Fatalf("tp expose, blocked, did not report the failed connect within 90s:\n%s", log.String())
		}
		time.Sleep(50 * time.Millisecond) // polling tp expose's log, bounded by the deadline
	}
	if strings.Contains(log.String(), "Exposing ") {
		t.Fatalf("tp expose registered through a network that blocks everything:\n%s", log.String())
	}
	// One sentence with the cause, not every carrier's error.
	if !strings.Contains(log.String(), "no answer within 5s") || strings.Contains(log.String(), "tls carrier") {
		t.Fatalf("tp expose's retry line does not say what failed in one sentence:\n%s", log.String())
	}
	t.Logf("blocked tp expose: %s", strings.TrimSpace(log.String()))
}

// exposeCmdIn is `tp expose args...` in the namespace ns, its standard
// output and error going to the returned log.
func exposeCmdIn(ns string, env []string, args ...string) (*exec.Cmd, *testlog.Buffer) {
	cmd := command("ip", append([]string{"netns", "exec", ns, binary("tp"), "expose"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	log := &testlog.Buffer{}
	cmd.Stdout, cmd.Stderr = log, log
	return cmd, log
}

// startExposeIn runs `tp expose NAME LOCAL flags...` in the namespace ns
// and waits for its "Exposing" line; stop interrupts it and waits for it
// to exit (also done at the test's end).
func startExposeIn(t testing.TB, ns string, env []string, name, local string, flags ...string) (log *testlog.Buffer, stop func()) {
	t.Helper()
	cmd, log := exposeCmdIn(ns, env, append([]string{name, local}, flags...)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Errorf("tp expose did not stop within 15s of Ctrl-C:\n%s", log.String())
		}
	}
	t.Cleanup(stop)
	deadline := time.Now().Add(90 * time.Second)
	for !hasLinePrefix(log.String(), "Exposing ") {
		select {
		case <-done:
			t.Fatalf("tp expose exited:\n%s", log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tp expose did not register within 90s:\n%s", log.String())
		}
		time.Sleep(20 * time.Millisecond) // polling for readiness, bounded by the deadline
	}
	return log, stop
}

func hasLinePrefix(s, prefix string) bool {
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), prefix) {
			return true
		}
	}
	return false
}
