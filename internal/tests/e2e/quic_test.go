package e2e

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// OpenSSH through `tp` with --transport quic (as TP_TRANSPORT): the request runs
// on a QUIC stream of tpd's UDP port.
func TestSSHOverQUIC(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)
	sd := startSSHD(t)
	env := append(srv.login(t, "alice", "laptop"), "TP_TRANSPORT=quic")
	stdout, stderr, err := sd.ssh(t, env, "127.0.0.1", "echo quic-$((6*7))")
	if err != nil || strings.TrimSpace(stdout) != "quic-42" {
		t.Fatalf("ssh over QUIC: %v, stdout %q\nstderr:\n%s", err, stdout, stderr)
	}
	// TP_TRANSPORT=quic has no fallback: the session ran on a QUIC stream.
}

// With tpd's QUIC off (as if UDP were blocked), auto falls back to TLS and
// remembers it in $TP_HOME, so the next run does not race again.
func TestAutoFallbackWhenUDPBlocked(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy, "TP_QUIC=false")
	env := srv.login(t, "alice", "laptop")
	echo := testnet.Echo(t)
	_, port, _ := net.SplitHostPort(echo)
	for i := range 2 {
		start := time.Now()
		out, err := runErr(env, strings.NewReader("ping"), binary("tp"), "127.0.0.1", port)
		if err != nil || !strings.HasSuffix(out, "ping") {
			t.Fatalf("tp auto without QUIC: %v\n%s", err, out)
		}
		t.Logf("run %d took %s", i, time.Since(start).Round(time.Millisecond))
	}
	home := strings.TrimPrefix(env[0], "TP_HOME=")
	b, err := os.ReadFile(filepath.Join(home, "transport-cache.json"))
	if err != nil || !strings.Contains(string(b), `"transport": "tls"`) {
		t.Fatalf("transport cache: %v\n%s", err, b)
	}
}

// A long-running `tp forward --transport quic` survives a tpd restart: it reports
// the break, reconnects with backoff, and forwards again.
func TestForwardQUICReconnects(t *testing.T) {
	parallel(t)
	srv := startStableServer(t, testPolicy) // started again on its port below
	env := append(srv.login(t, "alice", "laptop"), "TP_TRANSPORT=quic")
	echo := testnet.Echo(t)
	fwd, fwdLog := startForward(t, env, echo)
	roundTrip(t, fwd, "before")

	// Restart: stop the test's tpd, start another on the same port and data dir.
	stopTPD(t, srv)
	waitLog(t, fwdLog, "lost the QUIC connection", 15*time.Second)
	if !strings.Contains(fwdLog.String(), "shutting down or restarting") {
		t.Errorf("the break was not explained:\n%s", fwdLog.String())
	}
	startTPD(t, srv.DataDir, srv.Addr, nil) // the same port and data dir
	waitLog(t, fwdLog, "reconnected to", 30*time.Second)
	roundTrip(t, fwd, "after")
}

// After tpd crashes (SIGKILL) and comes back, a long-running tp forward over
// QUIC works again at once: the restarted tpd answers the old connection's packets
// with a stateless reset (its key is kept in the data dir), instead of leaving the
// client to find out at the 60 s idle timeout.
func TestForwardQUICAfterCrash(t *testing.T) {
	parallel(t)
	srv := startStableServer(t, testPolicy) // started again on its port below
	env := append(srv.login(t, "alice", "laptop"), "TP_TRANSPORT=quic")
	echo := testnet.Echo(t)
	fwd, _ := startForward(t, env, echo)
	roundTrip(t, fwd, "before")
	signalTPD(t, srv, syscall.SIGKILL)
	startTPD(t, srv.DataDir, srv.Addr, nil) // the same port and data dir
	start := time.Now()
	roundTrip(t, fwd, "after") // bounded by roundTrip's 20 s deadline, well under the idle timeout
	t.Logf("first round trip after the restart took %s", time.Since(start).Round(time.Millisecond))
}

func roundTrip(t *testing.T, addr, msg string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, msg)
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != msg {
		t.Fatalf("round trip through the forward: %q, %v; want %q", got, err, msg)
	}
}

func waitLog(t *testing.T, log *testlog.Buffer, want string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !strings.Contains(log.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q within %s:\n%s", want, within, log.String())
		}
		time.Sleep(20 * time.Millisecond) // polling a log, bounded by the deadline
	}
}

// adminListen is the address of srv's admin listener, which tpd logs once it
// serves it: tests start tpd with TP_ADMIN_LISTEN=127.0.0.1:0, since a port
// found free before tpd starts may be taken by a parallel test's process by
// the time tpd binds it.
func adminListen(t *testing.T, srv *server) string {
	t.Helper()
	waitLog(t, srv.log, "serving metrics and health checks", 30*time.Second)
	m := regexp.MustCompile(`msg="serving metrics and health checks" admin_listen=(\S+)`).FindStringSubmatch(srv.log.String())
	if m == nil {
		t.Fatalf("tpd logged no admin_listen address:\n%s", srv.log.String())
	}
	return m[1]
}

// stopTPD sends SIGTERM to srv's tpd and waits for the port.
func stopTPD(t *testing.T, srv *server) { t.Helper(); signalTPD(t, srv, syscall.SIGTERM) }

func signalTPD(t *testing.T, srv *server, sig syscall.Signal) {
	t.Helper()
	if err := srv.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signalling tpd: %v", err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", srv.Addr, time.Second)
		if err != nil {
			return
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("tpd did not stop within 15s of %v", sig)
		}
		time.Sleep(20 * time.Millisecond) // polling for the port to close
	}
}
