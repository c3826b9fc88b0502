package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
)

// ipNet is three network namespaces the test makes: the client host C, the
// TP host T (tpd, forwarding) and the service host S, joined by veth pairs:
//
//	C 10.201.1.2 (and .3) ── 10.201.1.1 T 10.201.2.1 ── 10.201.2.2 S (and 10.201.3.1, never granted)
//
// S routes the tunnel pool (100.96.0.0/16) back through T. Nothing leaves them.
type ipNet struct {
	C, T, S string
	tpd     *server
	tpdEnv  []string // tpd's environment, to restart it alike
}

func newIPNet(t testing.TB) *ipNet {
	t.Helper()
	p := nsName("tpip")
	n := &ipNet{C: p + "c", T: p + "t", S: p + "s"}
	for _, ns := range []string{n.C, n.T, n.S} {
		sh(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
		sh(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	sh(t, "ip", "link", "add", "c0", "netns", n.C, "type", "veth", "peer", "name", "t0", "netns", n.T)
	sh(t, "ip", "link", "add", "t1", "netns", n.T, "type", "veth", "peer", "name", "s0", "netns", n.S)
	for _, c := range [][]string{
		{n.C, "addr", "add", "10.201.1.2/24", "dev", "c0"}, {n.C, "link", "set", "c0", "up"},
		{n.C, "route", "add", "default", "via", "10.201.1.1"},
		{n.T, "addr", "add", "10.201.1.1/24", "dev", "t0"}, {n.T, "link", "set", "t0", "up"},
		{n.T, "addr", "add", "10.201.2.1/24", "dev", "t1"}, {n.T, "link", "set", "t1", "up"},
		{n.T, "route", "add", "10.201.3.0/24", "via", "10.201.2.2"},
		{n.S, "addr", "add", "10.201.2.2/24", "dev", "s0"}, {n.S, "addr", "add", "10.201.3.1/24", "dev", "s0"},
		{n.S, "link", "set", "s0", "up"}, {n.S, "route", "add", "100.96.0.0/16", "via", "10.201.2.1"},
		{n.S, "route", "add", "10.201.1.0/24", "via", "10.201.2.1"}, // plain routing, the figures' baseline
	} {
		sh(t, append([]string{"ip", "-n", c[0]}, c[1:]...)...)
	}
	sh(t, "ip", "netns", "exec", n.T, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	// Deleting C's first address keeps the second (the address change below).
	sh(t, "ip", "netns", "exec", n.C, "sysctl", "-qw", "net.ipv4.conf.c0.promote_secondaries=1")
	return n
}

// nsSeq numbers the network namespaces this test binary makes, so that tests
// running in parallel each get their own.
var nsSeq atomic.Int64

// nsName is a network namespace name unique to this binary and call: prefix,
// the process ID, a sequence number.
func nsName(prefix string) string {
	return fmt.Sprintf("%s%d-%d", prefix, os.Getpid()%100000, nsSeq.Add(1))
}

func sh(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// inNS runs f on a thread moved into the namespace ns: sockets f creates live
// there (and work from any thread afterwards). The thread then moves back and
// serves other goroutines again. It must not end: a process started from it
// with a parent-death signal (testpg's PostgreSQL, which every test on the
// database shares) would get that signal when it does. Only a thread that
// cannot move back ends, with its goroutine.
func inNS(t testing.TB, ns string, f func()) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		var err error
		defer func() { done <- err }() // also when f ends the goroutine
		runtime.LockOSThread()
		back, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			return
		}
		defer unix.Close(back)
		fd, err := unix.Open("/var/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
		}
		if err != nil {
			runtime.UnlockOSThread() // still in its own namespace
			return
		}
		defer func() {
			if unix.Setns(back, unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			}
		}()
		f()
	}()
	if err := <-done; err != nil {
		t.Fatalf("entering namespace %s: %v", ns, err)
	}
}

// ipPolicyE2E grants alice the service host's network, not 10.201.3.0/24.
const ipPolicyE2E = `package tp.authz

default allow := false

allow if {
	input.action == "ip"
	input.identity.user == "alice"
}

# tp forward to the service host, for the figures (ip_bench_test.go).
allow if {
	input.action == "dial"
	input.identity.user == "alice"
	count(input.destination.ips) > 0
	every ip in input.destination.ips { net.cidr_contains("10.201.2.0/24", ip) }
}

ip := {"routes": ["10.201.2.0/24"]} if input.action == "ip"
`

// startTPDIn is startTPD in the namespace ns.
func startTPDIn(t testing.TB, ns, dataDir, listen string, env []string) *server {
	t.Helper()
	s := &server{DataDir: dataDir, log: &testlog.Buffer{}, done: make(chan struct{}), mustStop: true}
	s.cmd = command("ip", "netns", "exec", ns, tpdServe(t), "serve", "--data-dir", dataDir, "--listen", listen,
		"--name", "localhost", "--name", strings.Split(listen, ":")[0])
	s.cmd.Env = append(os.Environ(), env...)
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr = s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(15 * time.Second):
			_ = s.cmd.Process.Kill()
			<-s.done
			t.Errorf("tpd did not stop within 15s of SIGTERM")
		}
		if t.Failed() {
			t.Logf("tpd log:\n%s", s.log.String())
		}
	})
	ready := make(chan error, 1)
	go func() {
		defer close(s.done)
		sc := bufio.NewScanner(stdout)
		listening := regexp.MustCompile(`listening on (\S+) \((\S+)\)`)
		for sc.Scan() {
			if m := listening.FindStringSubmatch(sc.Text()); m != nil {
				s.Addr, s.URL = m[1], m[2]
			}
			if fp, ok := strings.CutPrefix(sc.Text(), "CA fingerprint: "); ok {
				s.Fingerprint = fp
				ready <- nil
			}
		}
		ready <- fmt.Errorf("tpd exited before it was ready: %v", s.cmd.Wait())
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("%v\n%s", err, s.log.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("tpd did not start within 60s\n%s", s.log.String())
	}
	return s
}

// startTPIP runs `tp ip` in ns and waits for its "IP tunnel up" line.
func startTPIP(t testing.TB, ns string, env []string, args ...string) *testlog.Buffer {
	t.Helper()
	log, _ := startTPIPProc(t, ns, env, args...)
	return log
}

// startTPIPProc is startTPIP that also returns a channel closed when `tp ip`
// has exited.
func startTPIPProc(t testing.TB, ns string, env []string, args ...string) (*testlog.Buffer, <-chan struct{}) {
	t.Helper()
	log := &testlog.Buffer{}
	cmd := command("ip", append([]string{"netns", "exec", ns, binary("tp"), "ip", "--proxy-name", "proxy.localhost"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr, cmd.Stdout = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("tp ip:\n%s", log.String())
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(log.String(), "IP tunnel up on ") {
		select {
		case <-done:
			t.Fatalf("tp ip exited:\n%s", log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tp ip did not report the tunnel up within 60s:\n%s", log.String())
		}
		time.Sleep(20 * time.Millisecond) // polling for readiness, bounded by the deadline
	}
	return log, done
}

// serveBytes listens in S and sends n random bytes to each connection,
// returning the listener's address and the data's SHA-256.
func serveBytes(t testing.TB, n *ipNet, size int) (string, [32]byte) {
	t.Helper()
	data := make([]byte, size)
	_, _ = rand.Read(data)
	ln := listenOnS(t, n)
	go serveEach(ln, func(c net.Conn) { _, _ = c.Write(data) })
	return ln.Addr().String(), sha256.Sum256(data)
}

// listenOnS listens on S's tunnelled address, 10.201.2.2, until the test ends.
func listenOnS(t testing.TB, n *ipNet) net.Listener {
	t.Helper()
	var ln net.Listener
	inNS(t, n.S, func() {
		var err error
		if ln, err = net.Listen("tcp", "10.201.2.2:0"); err != nil {
			t.Error(err)
		}
	})
	if ln == nil {
		t.FailNow()
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dialIn connects from the namespace ns.
func dialIn(t testing.TB, ns, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	var err error
	inNS(t, ns, func() { c, err = net.DialTimeout("tcp", addr, 30*time.Second) })
	if err != nil {
		t.Fatalf("connecting to %s from %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// `tp ip` on the client host: ping and a TCP transfer with a checksum reach
// the service host through tpd's tunnel; a packet to a prefix the policy does
// not grant is dropped and counted; the hook ran with TUN_DEV_NAME and
// TUN_CLIENT_ID; and when the client host's address changes in the middle of a
// transfer, the transfer completes with the right checksum.
//
// Over HTTP/3 the TCP segments that carry data ride the request stream,
// whole (TCP_SEGMENT capsules of up to 64 KiB) both ways, and the rest (pure
// acknowledgements, ping) QUIC DATAGRAM frames: tpd's counters show both
// after 16 MiB each way.
func TestIPTunnelTPIP(t *testing.T) {
	parallel(t)
	n, env, hookDir := startIPE2E(t)
	tpip := startTPIP(t, n.C, env)
	if !strings.Contains(tpip.String(), "over=HTTP/3 tcp_on_stream=true tcp_segments=true") {
		t.Fatalf("tp ip did not run over HTTP/3 with TCP segments whole on the stream:\n%s", tpip.String())
	}
	checkIPHook(t, hookDir)
	testIPTunnelBody(t, n, tpip, true)
	m := ipPacketCounts(t, n)
	checkSegments(t, m, 16<<20)
	// 16 MiB in packets of at most 1,240 bytes of TCP data: 13,530 each way.
	// The receiving kernel acknowledges the segments the tun writes join
	// (up to 32 packets each): hundreds of pure acknowledgements, and a ping.
	for _, dir := range []string{"up", "down"} {
		if m["stream "+dir] < 13530 || m["all "+dir]-m["stream "+dir] < 20 {
			t.Errorf("%s: %v packets in all, %v of them on the stream; want at least 13,530 TCP segments on the stream and the acknowledgements (hundreds) as datagrams", dir, m["all "+dir], m["stream "+dir])
		}
	}
}

// `tp ip --tcp-in-datagrams` sends every packet as a QUIC DATAGRAM frame,
// and tpd answers the same way: nothing crosses the stream but the address
// and route capsules, and transfers each way arrive whole.
func TestIPTunnelTPIPTCPInDatagrams(t *testing.T) {
	parallel(t)
	n, env, _ := startIPE2E(t)
	tpip := startTPIP(t, n.C, env, "--transport", "quic", "--tcp-in-datagrams")
	if !strings.Contains(tpip.String(), "over=HTTP/3 tcp_on_stream=false") {
		t.Fatalf("tp ip --tcp-in-datagrams did not run over HTTP/3 with TCP in datagrams:\n%s", tpip.String())
	}
	if _, err := ping(t, n.C, "10.201.2.2"); err != nil {
		t.Fatalf("ping through the tunnel: %v\ntp ip:\n%s", err, tpip.String())
	}
	transferIn(t, n, 4<<20, "the 4 MiB download through the tunnel")
	transferOut(t, n, 4<<20, "the 4 MiB upload through the tunnel")
	m := ipPacketCounts(t, n)
	if m["stream up"] != 0 || m["stream down"] != 0 || m["all up"] < 3000 || m["all down"] < 3000 {
		t.Fatalf("packets on the stream up %v, down %v (want 0), in all up %v, down %v (want more than 3,000 each)", m["stream up"], m["stream down"], m["all up"], m["all down"])
	}
}

// checkSegments checks that most of a transfer of size bytes each way
// crossed tpd in segments whole: at least a segment per 64 KiB each way.
func checkSegments(t *testing.T, m map[string]float64, size int) {
	t.Helper()
	for _, dir := range []string{"up", "down"} {
		if want := float64(size / (64 << 10)); m["segments "+dir] < want {
			t.Errorf("%s: %v TCP segments crossed whole; want at least %v for %d bytes", dir, m["segments "+dir], want, size)
		}
	}
}

// ipPacketCounts reads tpd's packet counters: "all up", "all down" (every
// packet relayed), "stream up", "stream down" (those in DATAGRAM capsules
// on a request stream, or in segments whole) and "segments up", "segments
// down" (TCP segments that crossed whole).
func ipPacketCounts(t *testing.T, n *ipNet) map[string]float64 {
	t.Helper()
	m := map[string]float64{}
	for _, line := range strings.Split(scrapeIn(t, n.T, "http://127.0.0.1:9464/metrics"), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		v, _ := strconv.ParseFloat(f[1], 64)
		for _, dir := range []string{"up", "down"} {
			switch f[0] {
			case `tp_ip_packets_total{direction="` + dir + `"}`:
				m["all "+dir] = v
			case `tp_ip_stream_packets_total{direction="` + dir + `"}`:
				m["stream "+dir] = v
			case `tp_ip_segments_total{direction="` + dir + `"}`:
				m["segments "+dir] = v
			}
		}
	}
	if len(m) != 6 {
		t.Fatalf("tpd's metrics lack the IP tunnel's packet counters: %v", m)
	}
	return m
}

// The same over TCP: `tp ip --transport tls` runs CONNECT-IP over HTTP/2 with
// DATAGRAM capsules, for networks that pass no UDP.
func TestIPTunnelTPIPOverTCP(t *testing.T) {
	parallel(t)
	n, env, hookDir := startIPE2E(t)
	tpip := startTPIP(t, n.C, env, "--transport", "tls")
	if !strings.Contains(tpip.String(), "over=HTTP/2 tcp_on_stream=false tcp_segments=true") {
		t.Fatalf("tp ip --transport tls did not run over HTTP/2 with TCP segments whole:\n%s", tpip.String())
	}
	checkIPHook(t, hookDir)
	testIPTunnelBody(t, n, tpip, false)
	checkSegments(t, ipPacketCounts(t, n), 16<<20)
}

// startIPE2E makes the namespaces, starts tpd with IP tunnels on in T and logs
// alice in on C; it returns her TP_HOME and the hook's output directory.
func startIPE2E(t testing.TB, tpdEnv ...string) (*ipNet, []string, string) {
	t.Helper()
	n := newIPNet(t)
	hookDir := t.TempDir()
	hook := filepath.Join(hookDir, "hook.sh")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\n# written beside and renamed, so the test never reads a half-written file\nenv > \""+hookDir+"/.$TP_EVENT-$TUN_CLIENT_ID\" && mv \""+hookDir+"/.$TP_EVENT-$TUN_CLIENT_ID\" \""+hookDir+"/$TP_EVENT-$TUN_CLIENT_ID\"\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	dataDir := filepath.Join(t.TempDir(), "tpdata")
	if out, err := runErr(nil, nil, binary("tpd"), "init", "--data-dir", dataDir); err != nil {
		t.Fatalf("tpd init: %v\n%s", err, out)
	}
	if err := os.WriteFile(filepath.Join(dataDir, "policy", "tp.rego"), []byte(ipPolicyE2E), 0o600); err != nil {
		t.Fatal(err)
	}
	n.tpdEnv = append([]string{"TP_IP_TUNNEL=true", "TP_IP_HOOK=" + hook,
		// The tunnel's own bounds lifted (defaults: 50 MB/s and 100,000 packets
		// a second each way): the tests and the benchmark measure the path.
		"TP_IP_BYTES_PER_SECOND=1000000000", "TP_IP_PACKETS_PER_SECOND=10000000", "TP_ADMIN_LISTEN=127.0.0.1:9464"}, tpdEnv...)
	s := startTPDIn(t, n.T, dataDir, "10.201.1.1:0", n.tpdEnv)
	env := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "tp-home")}
	out, err := runErr(nil, nil, binary("tpd"), "enroll", "alice", "--device", "laptop", "--data-dir", s.DataDir)
	if err != nil {
		t.Fatalf("tpd enroll: %v\n%s", err, out)
	}
	var dlogin []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "dlogin ") {
			dlogin = strings.Fields(line)[1:]
		}
	}
	out, err = runErr(env, nil, "ip", append([]string{"netns", "exec", n.C, binary("dlogin")}, dlogin...)...)
	if err != nil || !strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin: %v\n%s", err, out)
	}
	n.tpd = s
	return n, env, hookDir
}

// checkIPHook checks that the hook ran for alice's tunnel on tpd's host.
func checkIPHook(t testing.TB, hookDir string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(hookDir, "up-alice@laptop"))
	if err != nil {
		t.Fatalf("the hook did not run: %v", err)
	}
	if !strings.Contains(string(b), "TUN_CLIENT_ID=alice@laptop") || !regexp.MustCompile(`(?m)^TUN_DEV_NAME=tpip\d+$`).Match(b) {
		t.Fatalf("hook environment:\n%s", b)
	}
}

// testIPTunnelBody checks a running tunnel: ping, a transfer with a checksum
// (across an address change of C when migrate), a denied prefix.
func testIPTunnelBody(t *testing.T, n *ipNet, tpip *testlog.Buffer, migrate bool) {
	t.Helper()
	if rtt, err := ping(t, n.C, "10.201.2.2"); err != nil {
		t.Fatalf("ping through the tunnel: %v\ntp ip:\n%s", err, tpip.String())
	} else {
		t.Logf("ping 10.201.2.2 through the tunnel: %s", rtt)
	}

	// A TCP transfer with a checksum; the client host's address moves from
	// 10.201.1.2 to 10.201.1.3 in its middle: after 4 MiB of 16, more than
	// the sender's socket buffer can hold ahead.
	addr, want := serveBytes(t, n, 16<<20)
	c := dialIn(t, n.C, addr)
	h := sha256.New()
	if _, err := io.CopyN(h, c, 4<<20); err != nil {
		t.Fatal(err)
	}
	if migrate {
		sh(t, "ip", "-n", n.C, "addr", "add", "10.201.1.3/24", "dev", "c0")
		sh(t, "ip", "-n", n.C, "addr", "del", "10.201.1.2/24", "dev", "c0")
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Minute))
	if _, err := io.Copy(h, c); err != nil {
		t.Fatalf("the transfer after the address change: %v\ntp ip:\n%s", err, tpip.String())
	}
	if got := [32]byte(h.Sum(nil)); got != want {
		t.Fatalf("checksum %x, want %x", got, want)
	}
	// tp ip looks at its address once a second, and the connection's packets
	// may already leave from the new address (the server follows them): a
	// tunnel that no longer loses the inner TCP's acknowledgements can finish
	// the transfer before tp ip moved, so wait for it.
	for deadline := time.Now().Add(15 * time.Second); migrate && !strings.Contains(tpip.String(), "the tunnel moved to it"); {
		if time.Now().After(deadline) {
			t.Fatalf("tp ip did not report moving its QUIC connection to the new address within 15 s of the transfer's end:\n%s", tpip.String())
		}
		time.Sleep(20 * time.Millisecond) // polling the log, bounded by the deadline
	}

	// The other way, with a checksum: the client's kernel hands tp ip its TCP
	// data in segments of up to 64 KiB (the tun device's offloads), which tp
	// ip splits into packets, and tpd joins them again for its tun device.
	transferOut(t, n, 16<<20, "the 16 MiB upload through the tunnel")

	// A prefix the policy does not grant: the client routes it into the
	// tunnel by hand; tpd drops and counts it, and nothing reaches S.
	dev := regexp.MustCompile(`IP tunnel up on (\S+):`).FindStringSubmatch(tpip.String())[1]
	sh(t, "ip", "-n", n.C, "route", "add", "10.201.3.0/24", "dev", dev)
	var got int
	var mu sync.Mutex
	inNS(t, n.S, func() {
		pc, err := net.ListenPacket("udp", "10.201.3.1:7")
		if err != nil {
			t.Error(err)
			return
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				if _, _, err := pc.ReadFrom(buf); err != nil {
					return
				}
				mu.Lock()
				got++
				mu.Unlock()
			}
		}()
	})
	inNS(t, n.C, func() {
		uc, err := net.Dial("udp", "10.201.3.1:7")
		if err == nil {
			_, err = uc.Write([]byte("to a prefix the policy does not grant"))
			uc.Close()
		}
		if err != nil {
			t.Error(err)
		}
	})
	var metrics string
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(metrics, `tp_ip_packets_dropped_total{reason="destination"} 1`) {
		if time.Now().After(deadline) {
			t.Fatalf("tpd did not count the dropped packet:\n%s", metrics)
		}
		time.Sleep(50 * time.Millisecond) // polling, bounded by the deadline
		metrics = scrapeIn(t, n.T, "http://127.0.0.1:9464/metrics")
	}
	// The granted prefix still answers, and the denied one saw nothing.
	if _, err := ping(t, n.C, "10.201.2.2"); err != nil {
		t.Fatalf("ping after the drop: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if got != 0 {
		t.Fatalf("the service host received %d datagrams for the denied prefix", got)
	}
}

// scrapeIn fetches url from inside the namespace ns.
func scrapeIn(t *testing.T, ns, url string) string {
	t.Helper()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			var err error
			inNS(t, ns, func() { c, err = (&net.Dialer{}).DialContext(ctx, network, addr) })
			return c, err
		}}}
	resp, err := hc.Get(url)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// ping sends one ICMP echo from the namespace ns to dst and waits for the
// reply (a raw ICMP socket, as ping does), returning the round trip.
func ping(t *testing.T, ns, dst string) (time.Duration, error) {
	t.Helper()
	var pc *icmp.PacketConn
	var err error
	inNS(t, ns, func() { pc, err = icmp.ListenPacket("ip4:icmp", "0.0.0.0") })
	if err != nil {
		return 0, err
	}
	defer pc.Close()
	id := os.Getpid() & 0xffff
	msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: 1, Data: []byte("tp ip e2e ping")}}
	b, _ := msg.Marshal(nil)
	start := time.Now()
	if _, err := pc.WriteTo(b, &net.IPAddr{IP: net.ParseIP(dst)}); err != nil {
		return 0, err
	}
	_ = pc.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return 0, err
		}
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || m.Type != ipv4.ICMPTypeEchoReply || from.String() != dst {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id {
			return time.Since(start), nil
		}
	}
}
