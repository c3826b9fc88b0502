package e2e

import (
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// tp forward's and tp expose's own lines, with the real binaries: each once
// said something wrong or unreadable (the old words are in the comments).
func TestForwardAndExposeLines(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)

	t.Run("a missing argument is named", func(t *testing.T) {
		// Bad input: tp forward with LOCAL only. tp once said "accepts 2
		// arg(s), received 1".
		out := expectFail(t, nil, "tp forward LOCAL", []string{
			`tp forward needs LOCAL and DEST (got only LOCAL "127.0.0.1:22960"): tp forward [--udp] LOCAL DEST, e.g. tp forward 127.0.0.1:15432 db.internal:5432`,
		}, binary("tp"), "forward", "127.0.0.1:22960")
		if strings.Contains(out, "arg(s)") || strings.HasPrefix(out, "tp: tp") {
			t.Errorf("tp forward LOCAL:\n%s", out)
		}
	})

	t.Run("a misspelled flag gets a suggestion", func(t *testing.T) {
		// Bad input: --upd for --udp. tp once said only "unknown flag: --upd".
		expectFail(t, nil, "tp forward --upd", []string{"unknown flag --upd for tp forward: did you mean --udp? (tp forward --help lists its flags)"},
			binary("tp"), "forward", "--upd", "127.0.0.1:5353", "127.0.0.1:53")
		// Bad input: --trasport, a flag of tp itself, before tp HOST PORT.
		expectFail(t, nil, "tp --trasport", []string{"unknown flag --trasport for tp: did you mean --transport? (tp --help lists its flags)"},
			binary("tp"), "--trasport", "tls", "127.0.0.1", "22")
	})

	t.Run("forward counts the bytes that went with the request", func(t *testing.T) {
		// Bad input: a client whose first 20,000 bytes wait at tp forward
		// before it accepts the connection (tp is stopped meanwhile), so that
		// 16 KiB of them go with the request. bytes_up once left those out.
		env := srv.login(t, "alice", "counter")
		const up, down, early = 100_000 + 3, 70_000 + 1, 20_000
		received := make(chan int64, 1)
		sink := testnet.Serve(t, func(c *net.TCPConn) {
			n, _ := io.Copy(io.Discard, c)
			received <- n
			_, _ = c.Write(bytes.Repeat([]byte{'d'}, down))
		})
		fwd, addr, log := startForwardProc(t, env, sink)
		if err := fwd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		defer fwd.Process.Signal(syscall.SIGCONT)
		c, err := net.Dial("tcp", addr) // the kernel completes it for the stopped tp
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(60 * time.Second))
		payload := bytes.Repeat([]byte{'u'}, up)
		if _, err := c.Write(payload[:early]); err != nil {
			t.Fatal(err)
		}
		waitAcked(t, c.(*net.TCPConn))
		if err := fwd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		wrote := make(chan error, 1)
		go func() {
			_, err := c.Write(payload[early:])
			if err == nil {
				err = c.(*net.TCPConn).CloseWrite()
			}
			wrote <- err
		}()
		got, err := io.ReadAll(c)
		if err != nil || len(got) != down {
			t.Fatalf("the client read %d bytes (%v); the sink sent %d", len(got), err, down)
		}
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
		if n := <-received; n != up {
			t.Fatalf("the sink received %d bytes; the client sent %d", n, up)
		}
		waitLog(t, log, "msg=forward ", 30*time.Second)
		m := regexp.MustCompile(`msg=forward .* bytes_up=(\d+) bytes_down=(\d+)`).FindStringSubmatch(log.String())
		if m == nil || m[1] != strconv.Itoa(up) || m[2] != strconv.Itoa(down) {
			t.Errorf("tp forward's line does not log bytes_up=%d bytes_down=%d:\n%s", up, down, log.String())
		}
	})

	t.Run("expose retries in one sentence when nothing listens", func(t *testing.T) {
		// Bad input: a profile whose server address has nothing listening.
		// tp expose once logged err="connecting to TP server … over QUIC: over
		// tls: … dial tcp …: connect: connection refused\nover ws: …\nover
		// http: …\nover udp: context canceled\n…" on every retry.
		env := srv.login(t, "alice", "agent")
		dead := pointAtNothing(t, srv, env)
		a := startAgentProc(t, env, "web", "127.0.0.1:9", "--allow-user", "bob")
		waitLog(t, a.log, "cannot reach the TP server", 90*time.Second)
		want := `msg="tp expose: cannot reach the TP server at ` + dead + `: nothing listens there (TCP connection refused); is tpd running, and is this its address? Next attempt in `
		if log := a.log.String(); !strings.Contains(log, want) {
			t.Errorf("tp expose's retry line does not say %q:\n%s", want, log)
		}
		for _, raw := range []string{"dial tcp", "over udp", "over tls", "control session ended"} {
			if strings.Contains(a.log.String(), raw) {
				t.Errorf("tp expose's retry line still says %q:\n%s", raw, a.log.String())
			}
		}
	})

	t.Run("forward retries in one sentence after tpd stopped", func(t *testing.T) {
		// Bad input: tpd stops under a running tp forward. tp forward once
		// printed "tp: reconnecting to … failed: connecting to TP server …
		// over QUIC: over tls: … dial tcp …: connect: connection refused" and
		// three lines more, for each carrier, on every retry.
		env := srv.login(t, "alice", "forwarder")
		addr, log := startForward(t, env, testnet.Echo(t))
		roundTrip(t, addr, "before the stop") // the QUIC connection is up
		stopTPD(t, srv)
		waitLog(t, log, "nothing listens there", 90*time.Second)
		line := regexp.MustCompile(`(?m)^tp: cannot reach the TP server at ` + regexp.QuoteMeta(srv.Addr) +
			`: nothing listens there \(TCP connection refused\); is tpd running, and is this its address\? Next attempt in [0-9.]+m?s\.$`)
		if !line.MatchString(log.String()) {
			t.Errorf("tp forward's retry line is not one sentence:\n%s", log.String())
		}
		for _, raw := range []string{"dial tcp", "over udp", "over tls", "reconnecting to"} {
			if strings.Contains(log.String(), raw) {
				t.Errorf("tp forward's retry line still says %q:\n%s", raw, log.String())
			}
		}
	})
}

// pointAtNothing rewrites the profile in env's TP_HOME to a loopback port
// where nothing listens, and returns that address.
func pointAtNothing(t *testing.T, srv *server, env []string) string {
	t.Helper()
	profile := filepath.Join(strings.TrimPrefix(env[0], "TP_HOME="), "profile.json")
	b, err := os.ReadFile(profile)
	if err != nil {
		t.Fatal(err)
	}
	dead := testnet.Refusing(t)
	if err := os.WriteFile(profile, []byte(strings.Replace(string(b), srv.URL, "https://"+dead, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	return dead
}

// waitAcked waits until the peer has acknowledged everything written on c:
// the bytes are in the peer's socket.
func waitAcked(t *testing.T, c *net.TCPConn) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		var queued int
		var qerr error
		if err := rc.Control(func(fd uintptr) { queued, qerr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) }); err != nil || qerr != nil {
			t.Fatal(err, qerr)
		}
		if queued == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d bytes still unacknowledged after 30s", queued)
		}
		time.Sleep(time.Millisecond) // polling the send queue, bounded by the deadline
	}
}
