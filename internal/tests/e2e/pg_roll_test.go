package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// The rolling restart's transfers: each uploads rollUp random bytes, then
// downloads rollDown bytes paced over 0–4 s, so that a drain (shutdown-timeout
// 2 s) finds some transfers that end within it and some it must abort.
// rollDialer dialers run them back to back, each with one in flight at any
// time, so that every drain meets live sessions of both kinds. Each transfer
// is a tp process and a session through two race-instrumented tpd and an
// agent: 50 dialers kept both cores busy for the whole test.
const (
	rollUp     = 64 << 10
	rollDown   = 256 << 10
	rollChunk  = 16 << 10
	rollDialer = 10
)

// pacedChecksumServer answers every connection with the SHA-256 of what it
// read until EOF, then rollDown random bytes in chunks with a random pause
// (0–250 ms) between them, then their SHA-256.
func pacedChecksumServer(t *testing.T) string {
	return testnet.Serve(t, func(c *net.TCPConn) {
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		fmt.Fprintf(c, "%x\n", h.Sum(nil))
		h.Reset()
		pause := time.Duration(mrand.IntN(250)) * time.Millisecond
		for range rollDown / rollChunk {
			if _, err := io.CopyN(io.MultiWriter(c, h), rand.Reader, rollChunk); err != nil {
				return
			}
			time.Sleep(pause) // pacing: the transfer spans a drain
		}
		fmt.Fprintf(c, "%x", h.Sum(nil))
	})
}

// rollOutcome is what one checksummed transfer through `tp HOST PORT` ended as.
type rollOutcome int

const (
	rollCompleted rollOutcome = iota // exit 0, both checksums match
	rollRefused                      // tp failed before any byte came back
	rollAborted                      // tp failed mid-transfer: the client saw the abort
	rollTruncated                    // tp exited 0 but bytes are missing or wrong: a silent truncation
)

// rollTransfer runs `tp NAME 22` (the ProxyCommand mode) as a process, uploads rollUp random bytes on its standard input, closes it, and
// checks what comes back on its standard output: the service's checksum of the
// upload, rollDown bytes, their checksum. tp's exit status is the client's
// verdict: 0 means it saw a clean end. Only a clean end with a wrong or short
// answer is a silent truncation.
func rollTransfer(env []string, name string) (rollOutcome, string) {
	cmd := command(binary("tp"), name, "22")
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return rollRefused, err.Error()
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return rollRefused, err.Error()
	}
	if err := cmd.Start(); err != nil {
		return rollRefused, err.Error()
	}
	timer := time.AfterFunc(2*time.Minute, func() { cmd.Process.Kill() }) // bound: a hung transfer fails as aborted
	defer timer.Stop()
	up := sha256.New()
	go func() {
		io.CopyN(io.MultiWriter(stdin, up), rand.Reader, rollUp) // an error here shows as tp's exit status
		stdin.Close()
	}()
	got, _ := io.ReadAll(stdout)
	werr := cmd.Wait()
	if werr != nil {
		if len(got) == 0 {
			return rollRefused, strings.TrimSpace(stderr.String())
		}
		return rollAborted, strings.TrimSpace(stderr.String())
	}
	// tp said the transfer ended cleanly: everything must be there.
	line, rest, ok := bytes.Cut(got, []byte("\n"))
	if !ok {
		return rollTruncated, fmt.Sprintf("clean end after %d bytes, no upload checksum", len(got))
	}
	if want := hex.EncodeToString(up.Sum(nil)); string(line) != want {
		return rollTruncated, fmt.Sprintf("clean end, but the service saw an upload with checksum %s, not %s", line, want)
	}
	if len(rest) < rollDown {
		return rollTruncated, fmt.Sprintf("clean end after %d of %d downloaded bytes", len(rest), rollDown)
	}
	if sum := sha256.Sum256(rest[:rollDown]); hex.EncodeToString(sum[:]) != string(rest[rollDown:]) {
		return rollTruncated, fmt.Sprintf("clean end, download checksum %x, the service sent %q", sum, rest[rollDown:])
	}
	return rollCompleted, ""
}

// Rolling restart of all three under 10 concurrent checksummed transfers:
// zero silent truncations. Three real tpd (A, B, C) on one PostgreSQL behind a
// TCP balancer that spreads connections over them (skipping one that refuses);
// alice's agent (`tp expose`, protected) and bob's 10 dialers reach tpd only
// through it. Each dialer runs `tp chat.rev.tp.internal 22` transfers back to
// back, each uploading 64 KiB and downloading 256 KiB paced over 0–4 s, both
// ways checksummed. Meanwhile A, then B, then C is drained (SIGTERM, the real
// drain with shutdown-timeout 2 s), must exit 0, and is restarted on the same
// address and data dir. Every transfer must either complete with both
// checksums matching or end with tp exiting non-zero (the client saw the
// refusal or abort): a transfer tp calls clean with missing or wrong bytes is a
// silent truncation and fails the test. After each restart, bob dials the
// name through the restarted instance itself (so the name survived, served
// from wherever the agent now is), and alice's agent never lost its name to a
// refusal. The figures (completed, refused, aborted) are logged.
// TestPGRollingRestartQUIC is the same over QUIC behind a UDP balancer.
func TestPGRollingRestart(t *testing.T) {
	parallelLong(t)
	raceTPD(t)
	env := []string{"TP_SHUTDOWN_TIMEOUT=2s"}
	// Fixed ports, below the kernel's ephemeral range: a restart takes the
	// ports its tpd let go, which a ":0" port would leave to any socket of
	// the machine's in the meantime.
	var listens []string
	for range 3 {
		listens = append(listens, fmt.Sprintf("127.0.0.1:%d", testnet.FreePort(t, "tcp+udp")))
	}
	srvs := startPeersAt(t, listens, peerPolicy, env)
	door := newFrontDoor(t, srvs[0].Addr, srvs[1].Addr, srvs[2].Addr)
	door.mode(true, false)
	doorURL := "https://" + door.ln.Addr().String()
	// The agent's own connections (its control session and one connection
	// per session it picks up, over --transport tls) must reach one instance:
	// its balancer keeps each client on the instance it last reached while
	// that one accepts (client affinity). docs/SCALE.md says so.
	agentDoor := newFrontDoor(t, srvs[0].Addr, srvs[1].Addr, srvs[2].Addr)
	agentDoor.mode(false, true)
	tls := "TP_TRANSPORT=tls"

	alice := srvs[0].login(t, "alice", "laptop")
	setServer(t, strings.TrimPrefix(alice[0], "TP_HOME="), "https://"+agentDoor.ln.Addr().String())
	bob := srvs[1].login(t, "bob", "phone")
	bobHome := strings.TrimPrefix(bob[0], "TP_HOME=")
	setServer(t, bobHome, doorURL)
	bob = append(bob, tls)
	expose := startExpose(t, append(alice, tls), "chat", pacedChecksumServer(t), "--allow-user", "bob")

	rig := rollRig{
		srvs:   srvs,
		names:  []string{"chat.rev.tp.internal"},
		agents: []*testlog.Buffer{expose},
		dial:   func(int) []string { return bob },
		direct: func(s *server) []string { return []string{"TP_HOME=" + homeOn(t, bobHome, s), tls} },
		restart: func(_ int, s *server) *server {
			return startTPD(t, s.DataDir, s.Addr, append([]string{"TP_DATABASE=" + envOf(s, "TP_DATABASE"), "TP_DATABASE_PASSWORD=" + envOf(s, "TP_DATABASE_PASSWORD")}, env...))
		},
	}
	rig.run(t)
}

// homeOn copies the TP_HOME home into a new one whose profile points at s.
func homeOn(t *testing.T, home string, s *server) string {
	t.Helper()
	h := filepath.Join(t.TempDir(), "tp-home")
	if err := os.CopyFS(h, os.DirFS(home)); err != nil {
		t.Fatal(err)
	}
	setServer(t, h, s.URL)
	return h
}

// rollRig is a rolling restart under load: the instances, the reverse names
// the dialers reach (dialer k dials names[k%len(names)]), the agents' logs,
// the environment of dialer k (through the balancer) and of a dial through
// instance s alone, and how instance i is started again on its address and
// data dir.
type rollRig struct {
	srvs    []*server
	names   []string
	agents  []*testlog.Buffer
	dial    func(k int) []string
	direct  func(s *server) []string
	restart func(i int, s *server) *server
}

// probe dials every name through each of srvs alone, all at once, until a
// transfer to each completes (an agent that is moving answers
// reverse_offline, which tp reports as an error), within 60 s.
func (r rollRig) probe(t *testing.T, what string, srvs ...*server) {
	t.Helper()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []string
	)
	for i, s := range srvs {
		penv := r.direct(s)
		for _, name := range r.names {
			wg.Go(func() {
				deadline := time.Now().Add(60 * time.Second)
				for {
					o, msg := rollTransfer(penv, name)
					if o == rollCompleted {
						return
					}
					if o == rollTruncated || time.Now().After(deadline) {
						mu.Lock()
						defer mu.Unlock()
						if o == rollTruncated {
							errs = append(errs, fmt.Sprintf("%s, through %s (%d), %s: silent truncation: %s", what, s.Addr, i, name, msg))
						} else {
							errs = append(errs, fmt.Sprintf("%s, through %s (%d), %s: no completed transfer within 60s; last: %s", what, s.Addr, i, name, msg))
						}
						return
					}
					time.Sleep(200 * time.Millisecond) // polling a retry, bounded by the deadline
				}
			})
		}
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%s\nagent logs:\n%s", strings.Join(errs, "\n"), r.agentLogs())
	}
}

func (r rollRig) agentLogs() string {
	var b strings.Builder
	for _, a := range r.agents {
		b.WriteString(a.String())
	}
	return b.String()
}

// run probes every instance, starts rollDialer dialers, drains and restarts
// each instance in turn (each must exit 0 having had live sessions to drain,
// and serve every name once restarted), lets every dialer complete a transfer
// more, stops them and fails the test on any silent truncation or an agent
// that lost a name to another identity.
func (r rollRig) run(t *testing.T) {
	t.Helper()
	began := time.Now()
	r.probe(t, "before the restarts", r.srvs...)
	t.Logf("every instance serves every name (%s into the rolling restart)", time.Since(began).Round(100*time.Millisecond))
	var (
		stop                                   atomic.Bool
		completed, refused, aborted, truncated atomic.Int64
		mu                                     sync.Mutex
		truncations, abortMsgs, refuseMsgs     []string
		wg                                     sync.WaitGroup
	)
	for k := range rollDialer {
		env, name := r.dial(k), r.names[k%len(r.names)]
		wg.Go(func() {
			for !stop.Load() {
				o, msg := rollTransfer(env, name)
				switch o {
				case rollCompleted:
					completed.Add(1)
				case rollRefused:
					refused.Add(1)
					mu.Lock()
					if len(refuseMsgs) < 5 {
						refuseMsgs = append(refuseMsgs, msg)
					}
					mu.Unlock()
					time.Sleep(100 * time.Millisecond) // a dialer's retry after a clean refusal
				case rollAborted:
					aborted.Add(1)
					mu.Lock()
					if len(abortMsgs) < 5 {
						abortMsgs = append(abortMsgs, msg)
					}
					mu.Unlock()
				case rollTruncated:
					truncated.Add(1)
					mu.Lock()
					truncations = append(truncations, msg)
					mu.Unlock()
				}
			}
		})
	}
	defer func() { stop.Store(true); wg.Wait() }()

	stopped := regexp.MustCompile(`msg=stopped drained=(\d+) cut=(\d+) forced=false took=(\S+)`)
	// Let the dialers get going (all start at once; rollDialer transfers
	// through show the path works) before the first drain.
	for completed.Load() < rollDialer {
		if truncated.Load() > 0 {
			break
		}
		time.Sleep(100 * time.Millisecond) // waiting for progress; the test's timeout bounds it
	}
	for i, s := range r.srvs {
		if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-s.done:
		case <-time.After(60 * time.Second):
			t.Fatalf("instance %d did not exit within 60s of SIGTERM (shutdown-timeout 2s)\n%s", i, s.log.String())
		}
		if code := s.cmd.ProcessState.ExitCode(); code != 0 {
			t.Fatalf("instance %d exited %d after its drain; want 0\n%s", i, code, s.log.String())
		}
		m := stopped.FindStringSubmatch(s.log.String())
		if m == nil {
			t.Fatalf("instance %d logged no stopped line\n%s", i, s.log.String())
		}
		if m[1] == "0" && m[2] == "0" {
			t.Fatalf("instance %d drained no live session: the restart proved nothing", i)
		}
		t.Logf("instance %d drained: %s sessions ended by themselves, %s cut at shutdown-timeout, took %s (%s into the rolling restart; transfers so far: %d completed, %d refused, %d aborted)",
			i, m[1], m[2], m[3], time.Since(began).Round(100*time.Millisecond), completed.Load(), refused.Load(), aborted.Load())
		n := r.restart(i, s)
		n.mustStop = true
		r.srvs[i] = n
		r.probe(t, fmt.Sprintf("after restarting instance %d, through it", i), n)
	}
	before := completed.Load()
	for deadline := time.Now().Add(3 * time.Minute); completed.Load() < before+rollDialer && truncated.Load() == 0; {
		if time.Now().After(deadline) {
			// Not Fatal: the dialers must stop first.
			t.Errorf("only %d transfers completed in 3 minutes after the last restart; want %d", completed.Load()-before, rollDialer)
			break
		}
		time.Sleep(100 * time.Millisecond) // polling the dialers, bounded by the deadline
	}
	stop.Store(true)
	wg.Wait()

	t.Logf("rolling restart of %d instances under %d dialers (%s): %d transfers completed with matching checksums, %d refused before any byte and retried, %d aborted mid-transfer (tp exited with an error), %d silent truncations",
		len(r.srvs), rollDialer, time.Since(began).Round(100*time.Millisecond), completed.Load(), refused.Load(), aborted.Load(), truncated.Load())
	for _, m := range refuseMsgs {
		t.Logf("a refusal as tp printed it: %s", m)
	}
	for _, m := range abortMsgs {
		t.Logf("an abort as tp printed it: %s", m)
	}
	if n := truncated.Load(); n > 0 {
		t.Fatalf("%d silent truncations (a transfer tp called clean had missing or wrong bytes), e.g. %s", n, truncations[0])
	}
	if strings.Contains(r.agentLogs(), "another identity") {
		t.Fatalf("an agent lost its name during the rolling restart:\n%s", r.agentLogs())
	}
	r.probe(t, "after the rolling restart", r.srvs...)
}

// envOf returns the value of key in the environment s was started with.
func envOf(s *server, key string) string {
	v := ""
	for _, kv := range s.cmd.Env {
		if w, ok := strings.CutPrefix(kv, key+"="); ok {
			v = w // the last one wins, as in exec
		}
	}
	return v
}
