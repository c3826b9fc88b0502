package e2e

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// natNet models two devices behind NATs, in network namespaces the test
// makes: the TP host T, the "internet" router between the NATs, where tpd
// listens on 10.210.1.1; the router R1 (WAN 10.210.1.2) masquerading LAN
// 192.168.1.0/24, where the agent's device A (192.168.1.2) runs tp expose;
// and the router R2 (WAN 10.210.2.2) masquerading 192.168.2.0/24, where the
// dialer's device D (192.168.2.2) runs tp. A path between A and D crosses both
// NATs and T's forwarding, never tpd. Nothing leaves the namespaces.
type natNet struct {
	T, R1, R2, A, D string
	tpd             *server
	alice, bob      []string // TP_HOME of alice (the agent, in A) and bob (in D)
}

const natTPD = "10.210.1.1"

// natPolicy lets alice expose names and bob dial them; nothing else.
const natPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user == "alice"
}

allow if {
	input.action == "dial"
	input.identity.user == "bob"
	input.destination.reverse != ""
}
`

// newNATNet makes the namespaces; symmetric makes both NATs map each
// destination to a port of its own (iptables --random-fully), as carrier-grade
// and many corporate NATs do, instead of keeping a socket's port for every
// destination (endpoint-independent mapping, Linux's default when the port is
// free).
func newNATNet(t testing.TB, symmetric bool) *natNet {
	t.Helper()
	return newNATNetWith(t, symmetric, natPolicy, nil)
}

// newNATNetWith is newNATNet with tpd's policy and environment.
func newNATNetWith(t testing.TB, symmetric bool, policy string, env []string) *natNet {
	t.Helper()
	p := nsName("tpnat")
	n := &natNet{T: p + "t", R1: p + "r", R2: p + "s", A: p + "a", D: p + "d"}
	for _, ns := range []string{n.T, n.R1, n.R2, n.A, n.D} {
		sh(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { _ = runQuiet("ip", "netns", "del", ns) })
		sh(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	link := func(a, an, b, bn string) {
		sh(t, "ip", "link", "add", an, "netns", a, "type", "veth", "peer", "name", bn, "netns", b)
		sh(t, "ip", "-n", a, "link", "set", an, "up")
		sh(t, "ip", "-n", b, "link", "set", bn, "up")
	}
	link(n.T, "t1", n.R1, "wan")
	link(n.T, "t2", n.R2, "wan")
	link(n.R1, "lan", n.A, "eth0")
	link(n.R2, "lan", n.D, "eth0")
	for _, c := range [][]string{
		{n.T, "addr", "add", natTPD + "/24", "dev", "t1"},
		{n.T, "addr", "add", "10.210.2.1/24", "dev", "t2"},
		{n.R1, "addr", "add", "10.210.1.2/24", "dev", "wan"},
		{n.R1, "addr", "add", "192.168.1.1/24", "dev", "lan"},
		{n.R1, "route", "add", "default", "via", natTPD},
		{n.R2, "addr", "add", "10.210.2.2/24", "dev", "wan"},
		{n.R2, "addr", "add", "192.168.2.1/24", "dev", "lan"},
		{n.R2, "route", "add", "default", "via", "10.210.2.1"},
		{n.A, "addr", "add", "192.168.1.2/24", "dev", "eth0"},
		{n.A, "route", "add", "default", "via", "192.168.1.1"},
		{n.D, "addr", "add", "192.168.2.2/24", "dev", "eth0"},
		{n.D, "route", "add", "default", "via", "192.168.2.1"},
	} {
		sh(t, append([]string{"ip", "-n", c[0]}, c[1:]...)...)
	}
	for _, ns := range []string{n.T, n.R1, n.R2} {
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	}
	for _, r := range []string{n.R1, n.R2} {
		args := []string{"ip", "netns", "exec", r, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"}
		if symmetric {
			args = append(args, "--random-fully")
		}
		sh(t, args...)
		// A home router's firewall: nothing new from the WAN, to the router or
		// through it. (Accepted, an unsolicited packet would leave a
		// connection-tracking entry that takes the port the LAN device's own
		// mapping needs, and Linux would then map it to another.)
		for _, chain := range []string{"INPUT", "FORWARD"} {
			sh(t, "ip", "netns", "exec", r, "iptables", "-w", "-A", chain, "-i", "wan", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
		}
	}
	n.tpd = startTPDIn(t, n.T, initTPD(t, policy), natTPD+":0", env)
	n.alice = n.login(t, n.A, "alice", "laptop")
	n.bob = n.login(t, n.D, "bob", "phone")
	return n
}

// addIPv6 gives the namespaces IPv6 as well, routed without NAT (unique local
// addresses: A fd11:1::2, D fd11:2::2, the routers' WANs on fd10:1:: and
// fd10:2:: towards T), each router with the stateful firewall of a home
// router's IPv6: nothing new from the WAN to the LAN or to itself. tpd keeps
// its IPv4 address only.
func (n *natNet) addIPv6(t testing.TB) {
	t.Helper()
	for _, c := range [][]string{
		{n.T, "addr", "add", "fd10:1::1/64", "dev", "t1", "nodad"},
		{n.T, "addr", "add", "fd10:2::1/64", "dev", "t2", "nodad"},
		{n.T, "route", "add", "fd11:1::/64", "via", "fd10:1::2"},
		{n.T, "route", "add", "fd11:2::/64", "via", "fd10:2::2"},
		{n.R1, "addr", "add", "fd10:1::2/64", "dev", "wan", "nodad"},
		{n.R1, "addr", "add", "fd11:1::1/64", "dev", "lan", "nodad"},
		{n.R1, "route", "add", "default", "via", "fd10:1::1"},
		{n.R2, "addr", "add", "fd10:2::2/64", "dev", "wan", "nodad"},
		{n.R2, "addr", "add", "fd11:2::1/64", "dev", "lan", "nodad"},
		{n.R2, "route", "add", "default", "via", "fd10:2::1"},
		{n.A, "addr", "add", "fd11:1::2/64", "dev", "eth0", "nodad"},
		{n.A, "route", "add", "default", "via", "fd11:1::1"},
		{n.D, "addr", "add", "fd11:2::2/64", "dev", "eth0", "nodad"},
		{n.D, "route", "add", "default", "via", "fd11:2::1"},
	} {
		sh(t, append([]string{"ip", "-6", "-n", c[0]}, c[1:]...)...)
	}
	for _, ns := range []string{n.T, n.R1, n.R2} {
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	}
	for _, r := range []string{n.R1, n.R2} {
		for _, chain := range []string{"INPUT", "FORWARD"} {
			sh(t, "ip", "netns", "exec", r, "ip6tables", "-w", "-A", chain, "-i", "wan", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
		}
	}
}

func runQuiet(name string, args ...string) error { return command(name, args...).Run() }

func (n *natNet) login(t testing.TB, ns, user, device string) []string {
	t.Helper()
	env := []string{"TP_HOME=" + filepath.Join(t.TempDir(), user+"-home")}
	out, err := runErr(env, nil, "ip", append([]string{"netns", "exec", ns, binary("dlogin")}, n.tpd.enroll(t, user, device)...)...)
	if err != nil || !strings.Contains(out, "Login successful!") {
		t.Fatalf("%s's dlogin in %s: %v\n%s", user, ns, err, out)
	}
	return env
}

// expose runs alice's tp expose of svc in A, in front of an echo service on
// A's loopback; its log says where its sessions with the dialer go.
func (n *natNet) expose(t testing.TB) *testlog.Buffer {
	t.Helper()
	var echo string
	inNS(t, n.A, func() { echo = testnet.Echo(t) })
	log, _ := startExposeIn(t, n.A, n.alice, "svc", echo, "--allow-user", "bob", "--debug")
	return log
}

// stream is a deterministic byte stream of size bytes that can stop at
// pauseAt until resume is closed (the test changes the network meanwhile).
type stream struct {
	rng     *rand.ChaCha8
	left    int
	sent    int
	pauseAt int
	paused  chan struct{}
	resume  chan struct{}
}

func newStream(size, pauseAt int) *stream {
	return &stream{rng: rand.NewChaCha8([32]byte{7}), left: size, pauseAt: pauseAt,
		paused: make(chan struct{}), resume: make(chan struct{})}
}

func (s *stream) Read(p []byte) (int, error) {
	if s.left == 0 {
		return 0, io.EOF
	}
	if s.pauseAt > 0 && s.sent == s.pauseAt {
		close(s.paused)
		<-s.resume
		s.pauseAt = 0
	}
	n := min(len(p), s.left)
	if s.pauseAt > 0 {
		n = min(n, s.pauseAt-s.sent)
	}
	_, _ = s.rng.Read(p[:n])
	s.left -= n
	s.sent += n
	return n, nil
}

// sum is the SHA-256 of a stream of size bytes.
func sum(size int) []byte {
	h := sha256.New()
	_, _ = io.Copy(h, newStream(size, 0))
	return h.Sum(nil)
}

// dial runs bob's `tp --direct --debug svc.rev.tp.internal 22` in D with in
// as its standard input, and returns its standard output's checksum and its
// log once it exits.
func (n *natNet) dial(t *testing.T, in io.Reader, extra ...string) (digest []byte, log *testlog.Buffer, err error) {
	t.Helper()
	log = &testlog.Buffer{}
	digest, err = n.dialInto(in, log, extra...)
	return digest, log, err
}

// dialInto is dial with the log the caller reads while tp runs.
func (n *natNet) dialInto(in io.Reader, log *testlog.Buffer, extra ...string) (digest []byte, err error) {
	args := append([]string{"netns", "exec", n.D, binary("tp"), "--direct", "--debug", "--timeout", "60s"}, extra...)
	cmd := command("ip", append(args, "svc.rev.tp.internal", "22")...)
	cmd.Env = append(os.Environ(), n.bob...)
	h := sha256.New()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = in, h, log
	err = cmd.Run()
	return h.Sum(nil), err
}

// Two devices behind endpoint-independent NATs: the session starts relayed
// through tpd and moves to a direct path (both ends say so); a cut of that
// path in the middle of a transfer (the router between the NATs drops their
// UDP) moves it back to the relay with every byte intact; and a revoke of the
// dialer's device ends the session on both ends although its bytes no longer
// crossed tpd.
func TestDirectPathThroughNATs(t *testing.T) {
	parallelLong(t)
	n := newNATNet(t, false)
	agentLog := n.expose(t)

	const size = 48 << 20
	log := n.transferOnDirect(t, agentLog, size, "through the NATs")
	if !strings.Contains(log.String(), "moved to a direct path") || !strings.Contains(agentLog.String(), "moved to a direct path") {
		t.Fatalf("the session did not move to a direct path between the NATs:\ndialer:\n%s\nagent:\n%s", log, agentLog)
	}
	waitLog(t, agentLog, "end-to-end QUIC pair ended", 30*time.Second)
	if !strings.Contains(pairEnd(agentLog), "large_direct=true") {
		t.Fatalf("the direct path between the NATs (MTU 1500) did not carry full-size packets:\n%s", agentLog)
	}

	// The direct path dies in the middle of a transfer.
	in := newStream(size, size/3)
	done := make(chan struct{})
	var cutDigest []byte
	var cutLog *testlog.Buffer
	var cutErr error
	go func() { defer close(done); cutDigest, cutLog, cutErr = n.dial(t, in) }()
	<-in.paused
	waitFor(t, 30*time.Second, "the second pair on the direct path", func() bool {
		return strings.Count(agentLog.String(), "moved to a direct path") >= 2
	})
	sh(t, "ip", "netns", "exec", n.T, "iptables", "-w", "-I", "FORWARD", "-p", "udp", "-j", "DROP")
	close(in.resume)
	<-done
	if cutErr != nil || !bytes.Equal(cutDigest, sum(size)) {
		t.Fatalf("a transfer whose direct path was cut: %v, checksum %x, want %x\n%s\nagent:\n%s", cutErr, cutDigest, sum(size), cutLog, agentLog)
	}
	if !strings.Contains(cutLog.String(), "relayed by the TP server again") {
		t.Fatalf("the dialer did not move back to the relay when the direct path died:\n%s", cutLog)
	}
	sh(t, "ip", "netns", "exec", n.T, "iptables", "-w", "-D", "FORWARD", "-p", "udp", "-j", "DROP")

	// A revoke while the session runs on the direct path.
	hold := newStream(1<<20, 1<<10)
	done = make(chan struct{})
	var revLog *testlog.Buffer
	var revErr error
	ended := strings.Count(agentLog.String(), "end-to-end QUIC pair ended")
	go func() { defer close(done); _, revLog, revErr = n.dial(t, hold) }()
	<-hold.paused
	waitFor(t, 30*time.Second, "a third pair on the direct path", func() bool {
		return strings.Count(agentLog.String(), "moved to a direct path") >= 3
	})
	run(t, nil, binary("tpd"), "revoke", "--device", "bob@phone", "--data-dir", n.tpd.DataDir)
	waitFor(t, 30*time.Second, "the agent ends the pair after the revoke", func() bool {
		return strings.Count(agentLog.String(), "end-to-end QUIC pair ended") > ended
	})
	close(hold.resume)
	<-done
	// As this end or the agent heard it first:
	if revErr == nil || !strings.Contains(revLog.String(), "the TP server cut the session that authorises the direct path: the device, its user or its certificate was revoked") {
		t.Fatalf("tp after its device was revoked: %v; want an exit that says why:\n%s", revErr, revLog)
	}
	t.Logf("the dialer after the revoke:\n%s", revLog)
}

// resumeOnDirect lets s go on with the rest of its bytes once the agent's log
// says the session moved to a direct path (or after 30 s: the test's checks
// then fail).
func resumeOnDirect(s *stream, agentLog *testlog.Buffer) {
	go func() {
		<-s.paused
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline) && !strings.Contains(agentLog.String(), "moved to a direct path"); {
			time.Sleep(20 * time.Millisecond) // polling the agent's log, bounded by the deadline
		}
		close(s.resume)
	}()
}

// holdOnDirect runs tp --direct in D with an input that pauses after 1 KiB,
// and returns once the agent says the session moved to a direct path: the
// session holds while the test acts. wait lets the input go on (into a pipe
// nobody reads, once the session ended) and returns tp's exit; it also runs
// at the test's end.
func (n *natNet) holdOnDirect(t *testing.T, agentLog *testlog.Buffer) (log *testlog.Buffer, wait func() error) {
	t.Helper()
	hold := newStream(1<<20, 1<<10)
	done := make(chan struct{})
	log = &testlog.Buffer{}
	var err error
	go func() { defer close(done); _, err = n.dialInto(hold, log) }()
	var once sync.Once
	wait = func() error {
		once.Do(func() { close(hold.resume) })
		<-done
		return err
	}
	t.Cleanup(func() { _ = wait() })
	<-hold.paused
	waitFor(t, 30*time.Second, "the pair on the direct path", func() bool {
		return strings.Contains(agentLog.String(), "moved to a direct path")
	})
	return log, wait
}

// transferOnDirect sends size bytes through tp --direct in D to the agent's
// echo, the rest of them once the session moved to a direct path, and fails
// the test unless every byte came back; what says where. It returns tp's log.
func (n *natNet) transferOnDirect(t *testing.T, agentLog *testlog.Buffer, size int, what string) *testlog.Buffer {
	t.Helper()
	in := newStream(size, 1<<20)
	resumeOnDirect(in, agentLog)
	digest, log, err := n.dial(t, in)
	if err != nil || !bytes.Equal(digest, sum(size)) {
		t.Fatalf("a transfer %s: %v, checksum %x, want %x\n%s\nagent:\n%s", what, err, digest, sum(size), log, agentLog)
	}
	return log
}

// pairEnd is the agent's log line for the first pair that ended.
func pairEnd(log *testlog.Buffer) string {
	for _, l := range strings.Split(log.String(), "\n") {
		if strings.Contains(l, "end-to-end QUIC pair ended") {
			return l
		}
	}
	return ""
}

// A device that moves to another network address in the middle of a
// session (the dialer's D, from 192.168.2.2 to .3: its NAT maps it anew, and
// the agent's router drops what comes from the new mapping): the session
// goes on over the relay, ICE gives up on the old pair, the dialer restarts
// ICE with new candidates, the session moves to a direct path again, and
// every byte arrives.
func TestDirectPathAfterTheDialerMoves(t *testing.T) {
	parallelLong(t)
	n := newNATNet(t, false)
	agentLog := n.expose(t)
	moved := func() int { return strings.Count(agentLog.String(), "moved to a direct path") }
	const size = 16 << 20
	in := newStream(size, 1<<20)
	go func() {
		<-in.paused
		defer close(in.resume) // the checks below fail the test when a step did not happen
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline) && moved() < 1; {
			time.Sleep(20 * time.Millisecond) // polling the agent's log, bounded by the deadline
		}
		for _, c := range [][]string{
			{"ip", "netns", "exec", n.D, "sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"},
			{"ip", "-n", n.D, "addr", "add", "192.168.2.3/24", "dev", "eth0"},
			{"ip", "-n", n.D, "addr", "del", "192.168.2.2/24", "dev", "eth0"},
			{"ip", "-n", n.D, "route", "replace", "default", "via", "192.168.2.1"},
		} {
			if out, err := command(c[0], c[1:]...).CombinedOutput(); err != nil {
				t.Errorf("%v: %v\n%s", c, err, out)
				return
			}
		}
		at := time.Now()
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline) && moved() < 2; {
			time.Sleep(20 * time.Millisecond) // polling the agent's log, bounded by the deadline
		}
		t.Logf("on a direct path again %s after the move", time.Since(at).Round(100*time.Millisecond))
	}()
	digest, log, err := n.dial(t, in)
	if err != nil || !bytes.Equal(digest, sum(size)) {
		t.Fatalf("a transfer whose dialer moved: %v, checksum %x, want %x\n%s\nagent:\n%s", err, digest, sum(size), log, agentLog)
	}
	if moved() < 2 || !strings.Contains(log.String(), "ICE restarts") {
		t.Fatalf("the session did not find a direct path again after the dialer moved (ICE restart):\ndialer:\n%s\nagent:\n%s", log, agentLog)
	}
}

// Where the route between the NATs carries 1400-byte packets and no more
// (the link between tpd's host and the dialer's router), the direct path's
// probe of a full-size QUIC packet never comes through: the small packets
// take the direct path, the full-size ones stay on the relay, and every byte
// arrives.
func TestDirectPathNarrowRoute(t *testing.T) {
	parallelLong(t)
	n := newNATNet(t, false)
	sh(t, "ip", "-n", n.T, "link", "set", "t2", "mtu", "1400")
	sh(t, "ip", "-n", n.R2, "link", "set", "wan", "mtu", "1400")
	agentLog := n.expose(t)
	n.transferOnDirect(t, agentLog, 16<<20, "over a route of MTU 1400")
	if !strings.Contains(agentLog.String(), "moved to a direct path") {
		t.Fatalf("the session did not move to the direct path (for its small packets):\n%s", agentLog)
	}
	waitLog(t, agentLog, "end-to-end QUIC pair ended", 30*time.Second)
	end := pairEnd(agentLog)
	t.Logf("the agent's pair: %s", end)
	m := regexp.MustCompile(`large_on_relay=(\d+)`).FindStringSubmatch(end)
	if !strings.Contains(end, "large_direct=false") || m == nil || m[1] == "0" {
		t.Fatalf("over a route of MTU 1400 the agent's full-size packets did not stay on the relay:\n%s", end)
	}
}

// Behind IPv4 NATs that let no direct path through (symmetric on both
// sides), two devices with IPv6 addresses (routed, behind stateful firewalls)
// find each other over IPv6: ICE's checks from both ends open both firewalls,
// the session moves to a direct path over IPv6, and the bytes arrive.
func TestDirectPathOverIPv6(t *testing.T) {
	parallelLong(t)
	n := newNATNet(t, true)
	n.addIPv6(t)
	agentLog := n.expose(t)
	log := n.transferOnDirect(t, agentLog, 16<<20, "between devices with IPv6")
	found := regexp.MustCompile(`direct path found.* remote="[^"]*fd11:1::2`).FindString(log.String())
	t.Logf("the dialer: %s", found)
	if found == "" || !strings.Contains(agentLog.String(), "moved to a direct path") {
		t.Fatalf("the session did not move to a direct path over IPv6 to fd11:1::2:\ndialer:\n%s\nagent:\n%s", log, agentLog)
	}
	waitLog(t, agentLog, "end-to-end QUIC pair ended", 30*time.Second)
	if end := pairEnd(agentLog); !strings.Contains(end, "large_direct=true") {
		t.Fatalf("the direct path over IPv6 (MTU 1500: 1452 bytes of UDP payload fit exactly) did not carry full-size packets:\n%s", end)
	}
}

// Behind NATs that map each destination to a port of their own on both
// sides, no candidate pair works: ICE gives up, the session stays relayed by
// tpd the whole time, and nothing fails.
func TestDirectPathSymmetricNATs(t *testing.T) {
	parallelLong(t)
	n := newNATNet(t, true)
	agentLog := n.expose(t)
	const size = 16 << 20
	in := newStream(size, 1<<20)
	go func() { // the rest once ICE gave up: the relay carries on
		<-in.paused
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline) && !strings.Contains(agentLog.String(), "state=Failed"); {
			time.Sleep(20 * time.Millisecond) // polling the agent's log, bounded by the deadline
		}
		close(in.resume)
	}()
	digest, log, err := n.dial(t, in)
	if err != nil || !bytes.Equal(digest, sum(size)) {
		t.Fatalf("a transfer through symmetric NATs: %v, checksum %x, want %x\n%s", err, digest, sum(size), log)
	}
	if !strings.Contains(agentLog.String(), "state=Failed") {
		t.Fatalf("ICE did not give up through two symmetric NATs:\n%s", agentLog)
	}
	if strings.Contains(log.String(), "moved to a direct path") {
		t.Fatalf("a direct path through two symmetric NATs:\n%s", log)
	}
	waitLog(t, agentLog, "end-to-end QUIC pair ended", 30*time.Second)
	if !strings.Contains(agentLog.String(), "direct_packets=0") {
		t.Fatalf("the agent counted direct packets through symmetric NATs:\n%s", agentLog)
	}
}

// Where the NATs drop every UDP datagram, tp and tp expose reach tpd over a
// TCP carrier; the pair runs over that relay, and the bytes arrive.
func TestDirectPathWithoutUDP(t *testing.T) {
	parallelLong(t)
	n := newNATNet(t, false)
	for _, r := range []string{n.R1, n.R2} {
		sh(t, "ip", "netns", "exec", r, "iptables", "-w", "-A", "FORWARD", "-p", "udp", "-j", "DROP")
	}
	agentLog := n.expose(t)
	const size = 8 << 20
	digest, log, err := n.dial(t, newStream(size, 0))
	if err != nil || !bytes.Equal(digest, sum(size)) {
		t.Fatalf("a transfer without UDP: %v, checksum %x, want %x\n%s\nagent:\n%s", err, digest, sum(size), log, agentLog)
	}
	if strings.Contains(log.String(), "moved to a direct path") {
		t.Fatalf("a direct path where no UDP gets through:\n%s", log)
	}
	waitLog(t, agentLog, "end-to-end QUIC pair ended", 30*time.Second)
}

// An end that cannot hear tpd stops the direct path: once everything from the
// dialer's NAT to tpd's host is dropped (the direct path between the NATs
// still works), the dialer's relayed session goes silent and, after 15 s
// without a word from tpd, tp ends with a sentence that says so.
func TestDirectPathEndsWhenTPIsSilent(t *testing.T) {
	parallelLong(t)
	n := newNATNet(t, false)
	agentLog := n.expose(t)
	log, wait := n.holdOnDirect(t, agentLog)
	sh(t, "ip", "netns", "exec", n.T, "iptables", "-w", "-I", "INPUT", "-s", "10.210.2.2", "-j", "DROP")
	// 15 s of silence, on either end: whichever hears it first ends the pair.
	waitLog(t, log, "no word from the TP server for 15s", 60*time.Second)
	waitLog(t, agentLog, "end-to-end QUIC pair ended", 30*time.Second)
	if err := wait(); err == nil {
		t.Fatalf("tp exited cleanly after tpd went silent:\n%s", log)
	}
}

// A policy change that no longer lets the dialer reach the name ends a
// session on the direct path, although its bytes no longer cross tpd: tpd
// cuts the relayed session that authorises the pair, and both ends stop.
func TestDirectPathEndsOnPolicyChange(t *testing.T) {
	parallelLong(t)
	n := newNATNet(t, false)
	agentLog := n.expose(t)
	log, wait := n.holdOnDirect(t, agentLog)
	// alice may still expose the name; bob may no longer dial it.
	listenOnly := strings.SplitN(natPolicy, "allow if {\n\tinput.action == \"dial\"", 2)[0]
	if listenOnly == natPolicy {
		t.Fatal("the test's policy has no dial rule to take away")
	}
	if err := os.WriteFile(filepath.Join(n.tpd.DataDir, "policy", "tp.rego"), []byte(listenOnly), 0o600); err != nil {
		t.Fatal(err)
	}
	waitLog(t, agentLog, "end-to-end QUIC pair ended", 30*time.Second)
	if err := wait(); err == nil || !strings.Contains(log.String(), "the TP server cut the session that authorises the direct path: the policy no longer allows the session") {
		t.Fatalf("tp after a policy change denied its session: %v; want an exit that says why:\n%s", wait(), log)
	}
}

// OpenSSH through a direct path: bob's ssh in D, with ProxyCommand "tp
// --direct %h %p", reaches the sshd on alice's device in A behind its NAT;
// the session moves to the direct path (tp says so on ssh's standard error)
// and 16 MiB uploaded to a remote sha256sum arrive intact.
func TestDirectPathOpenSSH(t *testing.T) {
	parallelLong(t)
	n := newNATNet(t, false)
	sshd := startSSHDIn(t, n.A)
	agentLog, _ := startExposeIn(t, n.A, n.alice, "laptop-ssh", fmt.Sprintf("127.0.0.1:%d", sshd.Port), "--allow-user", "bob")

	const size = 16 << 20
	var stdout, stderr testlog.Buffer
	ssh := command("ip", "netns", "exec", n.D, "ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
		"-o", "ProxyCommand="+binary("tp")+" --direct --debug %h %p", "-i", sshd.ClientKey,
		sshd.User+"@laptop-ssh.rev.tp.internal", "sleep 2; sha256sum")
	ssh.Env = append(os.Environ(), n.bob...)
	ssh.Stdin, ssh.Stdout, ssh.Stderr = newStream(size, 0), &stdout, &stderr
	if err := ssh.Run(); err != nil {
		t.Fatalf("ssh through tp --direct: %v\n%s\nagent:\n%s", err, stderr.String(), agentLog)
	}
	if got, want := strings.Fields(stdout.String()), fmt.Sprintf("%x", sum(size)); len(got) == 0 || got[0] != want {
		t.Fatalf("the remote sha256sum of the upload is %q; want %s\n%s", stdout.String(), want, stderr.String())
	}
	if !strings.Contains(stderr.String(), "moved to a direct path") || !strings.Contains(agentLog.String(), "moved to a direct path") {
		t.Fatalf("the ssh session did not move to a direct path:\n%s\nagent:\n%s", stderr.String(), agentLog)
	}
}
