package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// carrierNet is two network namespaces the test makes, joined by a veth pair:
// the client host C (10.203.1.2) and the TP host T (10.203.1.1), where tpd
// listens on a non-loopback address (so Go's proxy rules, which never proxy
// loopback, apply), Debian's tinyproxy listens on 10.203.1.1:8888, and the
// services tp reaches listen on T's own loopback. Nothing leaves them.
type carrierNet struct {
	C, T     string
	tpd      *server
	httpAddr string   // tpd's plain-HTTP listener
	env      []string // alice's TP_HOME
	home     string
	proxyLog string // tinyproxy's log file
}

const (
	carrierNetTPD   = "10.203.1.1"
	carrierNetProxy = "http://10.203.1.1:8888"
)

// newCarrierNet makes the namespaces, starts tpd in T (with a plain-HTTP
// listener) and logs alice in from C.
func newCarrierNet(t *testing.T) *carrierNet {
	t.Helper()
	return newCarrierNetWith(t, testPolicy)
}

// newCarrierNetWith is newCarrierNet with tpd's policy.
func newCarrierNetWith(t *testing.T, policy string) *carrierNet {
	t.Helper()
	p := nsName("tpcr")
	n := &carrierNet{C: p + "c", T: p + "t"}
	for _, ns := range []string{n.C, n.T} {
		sh(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
		sh(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	sh(t, "ip", "link", "add", "c0", "netns", n.C, "type", "veth", "peer", "name", "t0", "netns", n.T)
	for _, c := range [][]string{
		{n.C, "addr", "add", "10.203.1.2/24", "dev", "c0"}, {n.C, "link", "set", "c0", "up"},
		{n.T, "addr", "add", carrierNetTPD + "/24", "dev", "t0"}, {n.T, "link", "set", "t0", "up"},
	} {
		sh(t, append([]string{"ip", "-n", c[0]}, c[1:]...)...)
	}
	dataDir := initTPD(t, policy)
	n.tpd = startTPDIn(t, n.T, dataDir, carrierNetTPD+":0", []string{"TP_HTTP_LISTEN=" + carrierNetTPD + ":0"})
	deadline := time.Now().Add(30 * time.Second)
	re := regexp.MustCompile(`serving plain HTTP.*addr=(\S+)`)
	for n.httpAddr == "" {
		if m := re.FindStringSubmatch(n.tpd.log.String()); m != nil {
			n.httpAddr = strings.Trim(m[1], `"`)
		} else if time.Now().After(deadline) {
			t.Fatalf("tpd did not report its plain-HTTP listener:\n%s", n.tpd.log.String())
		} else {
			time.Sleep(20 * time.Millisecond) // polling tpd's log, bounded by the deadline
		}
	}
	n.home = filepath.Join(t.TempDir(), "tp-home")
	n.env = []string{"TP_HOME=" + n.home}
	out, err := runErr(n.env, nil, "ip", append([]string{"netns", "exec", n.C, binary("dlogin")}, n.tpd.enroll(t, "alice", "laptop")...)...)
	if err != nil || !strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin: %v\n%s", err, out)
	}
	return n
}

// startTinyproxy runs Debian's tinyproxy in T on 10.203.1.1:8888, for clients
// in C. connectPort is the one port it lets CONNECT reach (0: none, so it only
// forwards plain http:// requests).
func (n *carrierNet) startTinyproxy(t *testing.T, connectPort int) {
	t.Helper()
	dir := t.TempDir()
	n.proxyLog = filepath.Join(dir, "tinyproxy.log")
	if connectPort == 0 {
		connectPort = 1 // a port nothing listens on: CONNECT to tpd is refused
	}
	conf := fmt.Sprintf("Port 8888\nListen %s\nTimeout 600\nMaxClients 64\nAllow 10.203.1.0/24\nConnectPort %d\nLogFile %q\nLogLevel Connect\nPidFile %q\n",
		carrierNetTPD, connectPort, n.proxyLog, filepath.Join(dir, "tinyproxy.pid"))
	if err := os.WriteFile(filepath.Join(dir, "tinyproxy.conf"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	log := &testlog.Buffer{}
	cmd := command("ip", "netns", "exec", n.T, "tinyproxy", "-d", "-c", filepath.Join(dir, "tinyproxy.conf"))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting tinyproxy (apt-get install tinyproxy; deploy/test.sh --deps installs it): %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			b, _ := os.ReadFile(n.proxyLog)
			t.Logf("tinyproxy:\n%s%s", log.String(), b)
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		var c net.Conn
		var err error
		inNS(t, n.C, func() { c, err = net.DialTimeout("tcp", carrierNetTPD+":8888", time.Second) })
		if err == nil {
			_ = c.Close()
			return
		}
		select {
		case <-done:
			t.Fatalf("tinyproxy exited:\n%s", log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tinyproxy did not listen within 20s: %v\n%s", err, log.String())
		}
		time.Sleep(50 * time.Millisecond) // polling for the listener, bounded by the deadline
	}
}

// tpdPort is tpd's TCP (and UDP) port.
func (n *carrierNet) tpdPort(t *testing.T) string {
	_, port, err := net.SplitHostPort(n.tpd.Addr)
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// blockInC adds iptables rules to C's OUTPUT chain: every UDP datagram is
// dropped, and with direct, every TCP connection to tpd's own ports too, so
// that only the proxy gets through.
func (n *carrierNet) blockInC(t *testing.T, udp, direct bool) {
	t.Helper()
	ipt := []string{"ip", "netns", "exec", n.C, "iptables", "-w", "-A", "OUTPUT", "-o", "c0"}
	if udp {
		sh(t, append(ipt, "-p", "udp", "-j", "DROP")...)
	}
	if direct {
		_, httpPort, _ := net.SplitHostPort(n.httpAddr)
		for _, port := range []string{n.tpdPort(t), httpPort} {
			sh(t, append(ipt, "-p", "tcp", "-d", carrierNetTPD, "--dport", port, "-j", "DROP")...)
		}
	}
}

// tpIn runs the real tp in C with extra environment and arguments, with msg
// on its standard input.
func (n *carrierNet) tpIn(env []string, msg string, args ...string) (string, error) {
	return runErr(append(append([]string{}, n.env...), env...), strings.NewReader(msg), "ip",
		append([]string{"netns", "exec", n.C, binary("tp")}, args...)...)
}

// serviceInT listens on T's loopback (the policy grants alice 127.0.0.1 only)
// and echoes what each connection sends.
func (n *carrierNet) serviceInT(t *testing.T) string {
	t.Helper()
	var addr string
	inNS(t, n.T, func() { addr = testnet.Echo(t) })
	return addr
}

// rememberedCarrier is what $TP_HOME/transport-cache.json remembers as the
// carrier for tpd, and the key it is remembered under.
func (n *carrierNet) rememberedCarrier(t *testing.T) (string, string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(n.home, "transport-cache.json"))
	if err != nil {
		t.Fatalf("transport cache: %v", err)
	}
	var m map[string]struct {
		Transport string `json:"transport"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("transport cache: %v\n%s", err, b)
	}
	for k, e := range m {
		if strings.HasPrefix(k, "carrier:"+n.tpd.Addr) {
			return e.Transport, k
		}
	}
	t.Fatalf("the transport cache remembers no carrier for %s:\n%s", n.tpd.Addr, b)
	return "", ""
}

// TestCarrierEnvProxyInNamespace: on a client host whose network drops all
// UDP and every direct TCP connection to tpd (iptables in its namespace), so
// that only an HTTP proxy gets through, the real tp honours HTTPS_PROXY,
// https_proxy, HTTP_PROXY and NO_PROXY from its environment. tpd listens on a
// non-loopback address, so Go's loopback exemption does not apply; the proxy
// is Debian's tinyproxy. Transport auto picks a carrier through the proxy's
// CONNECT and remembers it for this server on this network; the ws carrier
// goes through CONNECT too; the http carrier goes through tinyproxy as a plain
// forwarding proxy to tpd's plain-HTTP listener. Bad input: NO_PROXY naming
// tpd, which sends the carrier straight into the dropped path: tp fails with
// a sentence, within its timeout.
func TestCarrierEnvProxyInNamespace(t *testing.T) {
	parallel(t)
	n := newCarrierNet(t)
	n.startTinyproxy(t, mustAtoi(t, n.tpdPort(t)))
	n.blockInC(t, true, true)
	echo := n.serviceInT(t)
	_, port, _ := net.SplitHostPort(echo)

	t.Run("auto through HTTPS_PROXY", func(t *testing.T) {
		out, err := n.tpIn([]string{"HTTPS_PROXY=" + carrierNetProxy}, "ping auto", "--timeout", "60s", "127.0.0.1", port)
		if err != nil || !strings.Contains(out, "ping auto") {
			t.Fatalf("tp auto through the proxy: %v\n%s", err, out)
		}
		carrier, key := n.rememberedCarrier(t)
		if carrier != "tls" || !strings.Contains(key, " on ") {
			t.Fatalf("remembered %q under %q; want the tls carrier, under a key naming the network", carrier, key)
		}
		t.Logf("remembered %s under %q", carrier, key)
		// The second run starts on the remembered carrier.
		out, err = n.tpIn([]string{"HTTPS_PROXY=" + carrierNetProxy}, "ping again", "--timeout", "60s", "127.0.0.1", port)
		if err != nil || !strings.Contains(out, "ping again") || strings.Contains(out, "no answer over UDP") {
			t.Fatalf("second tp auto: %v\n%s", err, out)
		}
	})
	t.Run("ws through https_proxy", func(t *testing.T) {
		out, err := n.tpIn([]string{"https_proxy=" + carrierNetProxy}, "ping ws", "--carrier", "ws", "--timeout", "60s", "127.0.0.1", port)
		if err != nil || !strings.Contains(out, "ping ws") {
			t.Fatalf("tp --carrier ws through the proxy: %v\n%s", err, out)
		}
	})
	t.Run("http through a plain forwarding proxy", func(t *testing.T) {
		out, err := n.tpIn([]string{"HTTP_PROXY=" + carrierNetProxy}, "ping http", "--carrier", "http",
			"--carrier-http-url", "http://"+n.httpAddr+"/.well-known/tp-carrier/http", "--timeout", "60s", "127.0.0.1", port)
		if err != nil || !strings.Contains(out, "ping http") {
			t.Fatalf("tp --carrier http through the proxy: %v\n%s", err, out)
		}
	})
	b, err := os.ReadFile(n.proxyLog)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"CONNECT " + n.tpd.Addr, "POST http://" + n.httpAddr + "/.well-known/tp-carrier/http"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("tinyproxy's log has no %q:\n%s", want, b)
		}
	}
	t.Run("NO_PROXY", func(t *testing.T) {
		start := time.Now()
		out, err := n.tpIn([]string{"HTTPS_PROXY=" + carrierNetProxy, "NO_PROXY=" + carrierNetTPD}, "x", "--carrier", "tls", "--timeout", "5s", "127.0.0.1", port)
		if err == nil {
			t.Fatalf("tp with NO_PROXY naming tpd reached it over the dropped path:\n%s", out)
		}
		if !strings.Contains(out, "tls carrier") {
			t.Fatalf("the error does not say what failed:\n%s", out)
		}
		t.Logf("failed in %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
	})
}

func mustAtoi(t *testing.T, s string) int {
	var n int
	if _, err := fmt.Sscan(s, &n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestCarrierUDPDroppedMidTransferInNamespace: `tp forward --carrier auto` in
// C starts a 2 MiB echo transfer over UDP; half-way, iptables in C starts
// dropping every UDP datagram. C reaches tpd's TCP ports only through
// tinyproxy, which forwards plain HTTP and refuses CONNECT, so the tls and ws
// carriers fail and the connection moves to the http carrier (polling through
// the proxy to tpd's plain-HTTP listener). The move follows the drop (tp
// forward reports none before it), through tls and ws, both refused, to http;
// the transfer completes with a matching checksum on the same stream, which
// is never reset: the second half, written after the drop, can only have
// crossed over http.
func TestCarrierUDPDroppedMidTransferInNamespace(t *testing.T) {
	parallel(t)
	n := newCarrierNet(t)
	n.startTinyproxy(t, 0)
	n.blockInC(t, false, true)
	echo := n.serviceInT(t)
	env := append(append([]string{}, n.env...), "HTTP_PROXY="+carrierNetProxy, "HTTPS_PROXY="+carrierNetProxy)
	// A head start of 20 s, so that the connection starts over UDP; on a host
	// so loaded that even the UDP handshake times out, tp forward is started
	// again (the start is not what this test is about; at most three tries).
	var addr string
	var log *testlog.Buffer
	var c net.Conn
	for try := 0; ; try++ {
		addr, log = startCarrierForward(t, n.C, env, echo, "--carrier", "auto", "--carrier-head-start", "20s",
			"--carrier-http-url", "http://"+n.httpAddr+"/.well-known/tp-carrier/http")
		c = dialIn(t, n.C, addr)
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatalf("the first echo byte: %v\n%s", err, log.String())
		}
		if !strings.Contains(log.String(), "connected over the") || try == 2 {
			break
		}
		t.Logf("tp forward did not start over UDP (try %d):\n%s", try+1, log.String())
	}
	// The echo of "x" is part of the stream: the payload follows it.
	_ = c.SetDeadline(time.Now().Add(3 * time.Minute))
	payload := make([]byte, 2<<20)
	_, _ = rand.Read(payload)
	want := sha256.Sum256(payload)
	movedBefore := make(chan string, 1) // tp forward's log when UDP was dropped, if it had moved already
	go func() {
		half := len(payload) / 2
		_, _ = c.Write(payload[:half])
		if l := log.String(); strings.Contains(l, "moved to") {
			movedBefore <- l
		}
		n.blockInC(t, true, false)
		_, _ = c.Write(payload[half:])
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	h := sha256.New()
	h.Write([]byte("x"))
	want = sha256.Sum256(append([]byte("x"), payload...))
	buf := make([]byte, 64<<10)
	var got int
	for {
		k, err := c.Read(buf)
		if k > 0 {
			h.Write(buf[:k])
			got += k
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("the stream failed after UDP was dropped (read %d of %d bytes): %v\ntp forward:\n%s", got, len(payload), err, log.String())
		}
	}
	if sum := h.Sum(nil); got != len(payload) || !bytes.Equal(sum, want[:]) {
		t.Fatalf("echoed %d bytes with sha256 %x, want %d with %x", got, sum, len(payload), want)
	}
	if strings.Contains(log.String(), "connected over the") {
		t.Fatalf("tp forward did not start over UDP:\n%s", log.String())
	}
	if !strings.Contains(log.String(), "moved to http") {
		t.Fatalf("tp forward did not report moving to the http carrier:\n%s", log.String())
	}
	if strings.Contains(log.String(), "lost the QUIC connection") {
		t.Fatalf("the QUIC connection was lost, not moved:\n%s", log.String())
	}
	select {
	case l := <-movedBefore:
		t.Fatalf("tp forward moved before UDP was dropped:\n%s", l)
	default:
	}
	// The move's way: tls, then ws, each refused by the proxy, then http.
	l := log.String()
	tls, ws, http := strings.Index(l, "moving to tls failed"), strings.Index(l, "moving to ws failed"), strings.Index(l, "moved to http")
	if tls < 0 || ws < tls || http < ws {
		t.Fatalf("tp forward did not report tls, then ws, failing before the move to http:\n%s", l)
	}
	t.Logf("tp forward:\n%s", l)
}

// startCarrierForward runs `tp forward [flags] 127.0.0.1:0 target` in the
// namespace ns and returns the address it listens on (in ns) and its log.
func startCarrierForward(t *testing.T, ns string, env []string, target string, flags ...string) (string, *testlog.Buffer) {
	t.Helper()
	args := append(append([]string{"netns", "exec", ns, binary("tp"), "forward"}, flags...), "127.0.0.1:0", target)
	cmd := command("ip", args...)
	cmd.Env = append(os.Environ(), env...)
	log := &testlog.Buffer{}
	cmd.Stdout, cmd.Stderr = log, log
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
			t.Logf("tp forward:\n%s", log.String())
		}
	})
	re := regexp.MustCompile(`Forwarding (\S+) to`)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if m := re.FindStringSubmatch(log.String()); m != nil {
			return m[1], log
		}
		select {
		case <-done:
			t.Fatalf("tp forward exited:\n%s", log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tp forward did not start within 60s:\n%s", log.String())
		}
		time.Sleep(20 * time.Millisecond) // polling for readiness, bounded by the deadline
	}
}

// TestNetworkIDInNamespace: the transport cache's network name (the real
// clients.NetworkID) differs between two networks a host reaches servers
// through (two veth interfaces with their own prefixes, in a namespace the
// test makes), is the same for two servers on one network and for the same server
// asked twice, and is empty where there is no route. Bad input: a server
// address that is not host:port.
func TestNetworkIDInNamespace(t *testing.T) {
	parallel(t)
	ns := nsName("tpnid")
	sh(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	for _, c := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "d1", "type", "veth", "peer", "name", "d1p"}, {"addr", "add", "10.204.1.2/24", "dev", "d1"},
		{"link", "set", "d1p", "up"}, {"link", "set", "d1", "up"},
		{"link", "add", "d2", "type", "veth", "peer", "name", "d2p"}, {"addr", "add", "10.204.2.2/24", "dev", "d2"},
		{"link", "set", "d2p", "up"}, {"link", "set", "d2", "up"},
	} {
		sh(t, append([]string{"ip", "-n", ns}, c...)...)
	}
	var a, a2, b, b2, none, bad string
	inNS(t, ns, func() {
		a, a2 = clients.NetworkID("10.204.1.1:443"), clients.NetworkID("10.204.1.77:8443")
		b, b2 = clients.NetworkID("10.204.2.1:443"), clients.NetworkID("10.204.2.1:443")
		none, bad = clients.NetworkID("192.0.2.1:443"), clients.NetworkID("10.204.1.1")
	})
	if a == "" || b == "" {
		t.Fatalf("no network name for a routed server: %q, %q", a, b)
	}
	if a != a2 {
		t.Errorf("two servers on one network: %q and %q", a, a2)
	}
	if b != b2 {
		t.Errorf("one server asked twice: %q and %q", b, b2)
	}
	if a == b {
		t.Errorf("two networks share the name %q", a)
	}
	if none != "" || bad != "" {
		t.Errorf("no route gave %q, a bad address %q; want both empty", none, bad)
	}
}
