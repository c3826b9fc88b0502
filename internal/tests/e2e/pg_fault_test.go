package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// pgCluster starts n real tpd processes on the database dsn with one CA (the
// first's ca/ copied to the others) and policy, lease 3 s, renewal 500 ms,
// each with an admin listener (for /readyz).
func pgCluster(t *testing.T, dsn string, n int, policy string) (srvs []*server, admin []string) {
	t.Helper()
	first := initTPD(t, policy)
	for i := range n {
		dir := first
		if i > 0 {
			dir = filepath.Join(t.TempDir(), "tpdata")
			if err := os.MkdirAll(filepath.Join(dir, "ca"), 0o700); err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{"root.crt", "root.key", "intermediate.crt", "intermediate.key", "attestation-root.crt", "attestation-root.key"} {
				b, err := os.ReadFile(filepath.Join(first, "ca", f))
				if err == nil {
					err = os.WriteFile(filepath.Join(dir, "ca", f), b, 0o600)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			run(t, nil, binary("tpd"), "init", "--data-dir", dir)
			if err := os.WriteFile(filepath.Join(dir, "policy", "tp.rego"), []byte(policy), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		env := []string{"TP_DATABASE=" + dsn, "TP_DATABASE_PASSWORD=" + testpg.Password,
			"TP_REVERSE_LEASE=3s", "TP_REVERSE_RENEW=500ms", "TP_ADMIN_LISTEN=127.0.0.1:0"}
		s := startTPD(t, dir, "127.0.0.1:0", env)
		srvs = append(srvs, s)
		admin = append(admin, adminListen(t, s))
	}
	return srvs, admin
}

// markerServer answers every connection with marker, then echoes: a dial's
// output says which agent's service it reached.
func markerServer(t *testing.T, marker string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.WriteString(c, marker+"\n")
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// tcpGate relays connections to target until closed; closing it refuses new
// connections but keeps the ones it relays (an agent whose reconnections no
// longer reach an instance, while its old connection lives).
func tcpGate(t *testing.T, target string) (addr string, closeGate func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.DialTimeout("tcp", target, 10*time.Second)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, u)
			mu.Unlock()
			go func() { _, _ = io.Copy(u, c); u.(*net.TCPConn).CloseWrite() }()
			go func() { _, _ = io.Copy(c, u); c.(*net.TCPConn).CloseWrite() }()
		}
	}()
	return ln.Addr().String(), func() { ln.Close() }
}

// copyHome is a second TP_HOME of the same device (its key and certificate)
// whose profile names server: a second agent of one device.
func copyHome(t testing.TB, env []string, server string) []string {
	t.Helper()
	src := strings.TrimPrefix(env[0], "TP_HOME=")
	dst := filepath.Join(t.TempDir(), "tp-home")
	if out, err := exec.Command("cp", "-a", src, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp -a %s: %v\n%s", src, err, out)
	}
	setServer(t, dst, server)
	return []string{"TP_HOME=" + dst}
}

// withHost is url with its host:port replaced by addr.
func withHost(t testing.TB, raw, addr string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = addr
	return u.String()
}

// A frozen holder among three real tpd on one PostgreSQL, lease 3 s: alice's
// agent 1 reaches A (through a gate) and serves laptop-ssh; A is frozen with
// SIGSTOP, the gate closes (agent 1's connection to A stays, its
// reconnections fail), and alice's agent 2 registers laptop-ssh on B (the
// same device takes its name over); after 6 s (twice the lease) A gets
// SIGCONT. From then on, no dial through any instance reaches agent 1: A has
// stopped serving the name on its own (fenced, or, when agent 1 left the
// silent A first, because its control session ended), so one name is never
// served by two instances; dials through B reach agent 2.
func TestPGFaultFrozenHolderThreeInstances(t *testing.T) {
	parallel(t)
	raceTPD(t)
	_, dsn := testpg.NewDatabase(t)
	srvs, _ := pgCluster(t, dsn, 3, reversePolicy)
	a, b, c := srvs[0], srvs[1], srvs[2]
	alice := a.login(t, "alice", "laptop")
	bob := a.login(t, "bob", "phone")
	tr := "TP_TRANSPORT=tls"
	gate, closeGate := tcpGate(t, a.Addr)
	agent1 := copyHome(t, alice, withHost(t, a.URL, gate))
	agent2 := copyHome(t, alice, b.URL)
	startExpose(t, append(agent1, tr), "laptop-ssh", markerServer(t, "agent-1"), "--allow-user", "bob")
	bobVia := map[*server][]string{} // bob's device, one TP_HOME per instance, so that dials run at once
	for _, s := range srvs {
		bobVia[s] = append(copyHome(t, bob, s.URL), tr)
	}
	dial := func(s *server) (string, error) {
		return runErr(bobVia[s], strings.NewReader("ping"), binary("tp"), "laptop-ssh.rev.tp.internal", "22")
	}
	if out, err := dial(a); err != nil || !strings.Contains(out, "agent-1") {
		t.Fatalf("bob through A before the freeze: %v\n%s", err, out)
	}

	closeGate()
	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	t.Cleanup(func() { a.cmd.Process.Signal(syscall.SIGCONT) }) // so that its cleanup can stop it
	startExpose(t, append(agent2, tr), "laptop-ssh", markerServer(t, "agent-2"), "--allow-user", "bob")
	if out, err := dial(b); err != nil || !strings.Contains(out, "agent-2") {
		t.Fatalf("bob through B after agent 2 registered there: %v\n%s", err, out)
	}
	time.Sleep(time.Until(stopped.Add(6 * time.Second))) // deliberately twice the 3 s lease
	if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	// Right after SIGCONT and until A says it fenced: every dial through any
	// instance either is refused or reaches agent 2, never agent 1. A round
	// dials through the three at once; the deadline bounds the wait for A's
	// fence and for a dial through B to reach agent 2, after which the rounds
	// go on until there were three (counted, not timed: a round of three tp
	// processes takes seconds on a loaded machine).
	deadline := time.Now().Add(30 * time.Second)
	viaB := 0 // dials through B that reached agent 2 (a busy machine may make one fail)
	for round := 0; ; round++ {
		via := []*server{a, c, b}
		outs, errs := make([]string, len(via)), make([]error, len(via))
		var wg sync.WaitGroup
		for i, s := range via {
			wg.Go(func() { outs[i], errs[i] = dial(s) })
		}
		wg.Wait()
		for i, s := range via {
			out, err := outs[i], errs[i]
			if strings.Contains(out, "agent-1") {
				t.Fatalf("a dial through %s after SIGCONT reached agent 1, whose instance A had lost the name to B:\n%s\nA's log:\n%s", s.URL, out, a.log.String())
			}
			if err == nil && !strings.Contains(out, "agent-2") {
				t.Fatalf("a dial through %s succeeded without reaching agent 2:\n%s", s.URL, out)
			}
			if s == b && err == nil {
				viaB++
			}
		}
		fenced := strings.Contains(a.log.String(), "reverse names fenced") || strings.Contains(a.log.String(), "took over") ||
			strings.Contains(a.log.String(), `dest="listen laptop-ssh.rev.tp.internal"`) && strings.Contains(a.log.String(), `end="control stream ended`)
		if fenced && viaB > 0 {
			if round >= 2 {
				break
			}
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("30s after SIGCONT, A has not logged that it stopped serving laptop-ssh, or no dial through B reached agent 2 (%d):\n%s", viaB, a.log.String())
		}
	}
}

// startAgentAsync starts `tp expose` and returns its log at once, without
// waiting for it to register (a registration that is refused, then retried).
func startAgentAsync(t *testing.T, env []string, args ...string) *testlog.Buffer {
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
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			log.Write([]byte(sc.Text() + "\n"))
		}
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		cmd.Wait()
		if t.Failed() {
			t.Logf("tp expose %s log:\n%s", strings.Join(args, " "), log.String())
		}
	})
	return log
}

// openTP starts `tp host port` and returns its stdin and stdout: one open
// session through the profile's server.
func openTP(t *testing.T, env []string, host, port string) (io.WriteCloser, *bufio.Reader) {
	t.Helper()
	cmd := command(binary("tp"), host, port)
	cmd.Env = append(os.Environ(), env...)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Its end, then Ctrl-C, so that tp closes its connection (a killed
		// tp's QUIC connection would keep tpd's drain waiting).
		in.Close()
		cmd.Process.Signal(os.Interrupt)
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	return in, bufio.NewReader(out)
}

// sessionEcho writes line on an open session and reads its echo, within 30 s.
func sessionEcho(in io.Writer, out *bufio.Reader, line string) error {
	res := make(chan error, 1)
	go func() {
		if _, err := io.WriteString(in, line+"\n"); err != nil {
			res <- err
			return
		}
		got, err := out.ReadString('\n')
		if err == nil && got != line+"\n" {
			err = fmt.Errorf("read %q, want %q", got, line)
		}
		res <- err
	}()
	select {
	case err := <-res:
		return err
	case <-time.After(30 * time.Second):
		return fmt.Errorf("no echo of %q within 30s", line)
	}
}

// readyzOf is an instance's /readyz status and body.
func readyzOf(t *testing.T, admin string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + admin + "/readyz")
	if err != nil {
		t.Fatalf("/readyz on %s: %v", admin, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// PostgreSQL stopped for 20 s under three real tpd: each says so (its log,
// /readyz "ready (degraded)" naming the database, tpd status), keeps serving
// plain dials and the session opened before, refuses a new listen with a
// reason the agent logs (its retries go on), and recovers without a restart:
// the same agent process registers once PostgreSQL is back, and bob reaches
// it through its instance.
func TestPGFaultDatabaseStopped20s(t *testing.T) {
	parallelLong(t)
	raceTPD(t)
	pg, err := testpg.New() // its own server: stopping it touches no other test
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg.Close() })
	name, err := pg.CreateDatabase(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	policy := reversePolicy + "\nallow if {\n\tinput.action == \"dial\"\n\tinput.identity.user == \"bob\"\n\tinput.destination.host == \"127.0.0.1\"\n}\n"
	srvs, admin := pgCluster(t, pg.DSN(name), 3, policy)
	a, b, c := srvs[0], srvs[1], srvs[2]
	bob := b.login(t, "bob", "phone")
	carol := c.login(t, "alice", "desktop") // alice's second device: a listen during the outage
	echo := testnet.Echo(t)
	host, port, _ := strings.Cut(echo, ":")
	in, out := openTP(t, bob, host, port) // bob's session through B
	if err := sessionEcho(in, out, "before the outage"); err != nil {
		t.Fatalf("bob's session through B before the outage: %v", err)
	}
	for i, adm := range admin {
		if code, body := readyzOf(t, adm); code != http.StatusOK || body != "ready\n" {
			t.Fatalf("/readyz of instance %d before the outage: %d %q", i, code, body)
		}
	}

	if err := pg.Stop(); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	for _, s := range srvs {
		waitFor(t, 30*time.Second, "tpd logs that it lost the database", func() bool { return strings.Contains(s.log.String(), "lost the database") })
	}
	for i, adm := range admin {
		if code, body := readyzOf(t, adm); code != http.StatusOK || !strings.Contains(body, "ready (degraded)") || !strings.Contains(body, "database is unreachable") {
			t.Fatalf("/readyz of instance %d while PostgreSQL is stopped: %d %q; want 200, degraded, naming the database", i, code, body)
		}
	}
	if st := run(t, nil, binary("tpd"), "status", "--data-dir", a.DataDir); !strings.Contains(st, "database is unreachable") {
		t.Fatalf("tpd status on A while PostgreSQL is stopped:\n%s", st)
	}
	if err := sessionEcho(in, out, "during the outage"); err != nil {
		t.Fatalf("bob's open session through B while PostgreSQL is stopped: %v", err)
	}
	setServer(t, strings.TrimPrefix(bob[0], "TP_HOME="), a.URL)
	if got, err := runErr(bob, strings.NewReader("plain dial via A"), binary("tp"), host, port); err != nil || !strings.Contains(got, "plain dial via A") {
		t.Fatalf("bob's new plain dial through A while PostgreSQL is stopped: %v\n%s", err, got)
	}
	listen := startAgentAsync(t, append(carol, "TP_TRANSPORT=tls"), "laptop-ssh", markerServer(t, "carol"), "--allow-user", "bob")
	waitFor(t, 30*time.Second, "the agent is told why its listen is refused", func() bool {
		return strings.Contains(listen.String(), "cannot record the names in its database just now")
	})
	if strings.Contains(listen.String(), "Exposing ") {
		t.Fatalf("a listen registered on C while PostgreSQL is stopped:\n%s", listen.String())
	}
	time.Sleep(time.Until(stopped.Add(20 * time.Second))) // the outage the issue names

	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	for _, s := range srvs {
		waitFor(t, 60*time.Second, "tpd logs that the database is back", func() bool { return strings.Contains(s.log.String(), "the database is back") })
	}
	waitFor(t, 90*time.Second, "the same agent registers on C once PostgreSQL is back", func() bool { return strings.Contains(listen.String(), "Exposing ") })
	setServer(t, strings.TrimPrefix(bob[0], "TP_HOME="), c.URL)
	if got, err := runErr(append(bob, "TP_TRANSPORT=tls"), strings.NewReader("x"), binary("tp"), "laptop-ssh.rev.tp.internal", "22"); err != nil || !strings.Contains(got, "carol") {
		t.Fatalf("bob through C to the name registered after the outage: %v\n%s", err, got)
	}
	for i, adm := range admin {
		waitFor(t, 30*time.Second, fmt.Sprintf("/readyz of instance %d says ready", i), func() bool {
			code, body := readyzOf(t, adm)
			return code == http.StatusOK && body == "ready\n"
		})
	}
	if err := sessionEcho(in, out, "after the outage"); err != nil {
		t.Fatalf("bob's session through B after the outage: %v", err)
	}
}

// waitFor polls cond every 50 ms until it holds or within has passed.
func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", within, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
