package e2e

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// A frozen holder, with the real binaries: tpd on PostgreSQL (lease 3 s)
// serves alice's laptop-ssh; SIGSTOP freezes it longer than its lease; after
// SIGCONT it no longer serves the name under the lapsed lease: it fences it
// (and tells the agent why), or first sees the control session end that the
// agent left during the freeze, having heard no ping for twice the announced
// 500 ms. Bob reaches the name again once the agent re-claimed it.
func TestPGLeasesSIGSTOP(t *testing.T) {
	parallel(t)
	raceTPD(t)
	_, dsn := testpg.NewDatabase(t)
	env := []string{"TP_DATABASE=" + dsn, "TP_DATABASE_PASSWORD=" + testpg.Password,
		"TP_REVERSE_LEASE=3s", "TP_REVERSE_RENEW=500ms"}
	srv := startTPD(t, initTPD(t, reversePolicy), "127.0.0.1:0", env)
	alice := srv.login(t, "alice", "laptop")
	bob := srv.login(t, "bob", "phone")
	echo := testnet.Echo(t)
	tr := "TP_TRANSPORT=tls"
	expose := startExpose(t, append(alice, tr), "laptop-ssh", echo, "--allow-user", "bob")
	dial := func(msg string) (string, error) {
		return runErr(append(bob, tr), strings.NewReader(msg), binary("tp"), "laptop-ssh.rev.tp.internal", "22")
	}
	if out, err := dial("before the freeze"); err != nil || !strings.Contains(out, "before the freeze") {
		t.Fatalf("bob before the freeze: %v\n%s", err, out)
	}

	if err := srv.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Second) // deliberately longer than the 3 s lease
	if err := srv.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	// Either order of two events: tpd fenced the name (or first saw the
	// agent's control session end), and the agent was told (or had left).
	stopped := func() bool {
		return strings.Contains(srv.log.String(), "reverse names fenced") ||
			strings.Contains(srv.log.String(), `dest="listen laptop-ssh.rev.tp.internal"`) && strings.Contains(srv.log.String(), `end="control stream ended`)
	}
	moved := func() bool {
		return strings.Contains(expose.String(), "could not renew its lease") || strings.Contains(expose.String(), "the TP server sent nothing for")
	}
	for !stopped() || !moved() {
		if time.Now().After(deadline) {
			t.Fatalf("30s after SIGCONT, tpd has neither fenced laptop-ssh and told the agent, nor ended the control session the agent left; tpd log:\n%s\nexpose log:\n%s", srv.log.String(), expose.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for {
		out, err := dial("after the freeze")
		if err == nil && strings.Contains(out, "after the freeze") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bob after the agent re-claimed laptop-ssh: %v\n%s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
