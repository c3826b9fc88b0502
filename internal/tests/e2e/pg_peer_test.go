package e2e

import (
	"bufio"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
	"github.com/tp-proxy/tp/proxy/wire"
)

const peerPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user == "alice"
}

allow if {
	input.action == "expose_public"
	input.identity.user == "alice"
}

allow if {
	input.action in {"dial", "dial_udp"}
	input.identity.user == "bob"
	input.destination.reverse != ""
}
`

// startPeers runs n tpd processes on one PostgreSQL database, with one ca/
// and one policy; env goes to every one of them.
func startPeers(t *testing.T, n int, policy string, env []string) []*server {
	t.Helper()
	listens := make([]string, n)
	for i := range listens {
		listens[i] = "127.0.0.1:0"
	}
	return startPeersAt(t, listens, policy, env)
}

// startPeersAt runs one tpd per listen address (see startPeers).
func startPeersAt(t *testing.T, listens []string, policy string, env []string) []*server {
	t.Helper()
	n := len(listens)
	_, dsn := testpg.NewDatabase(t)
	env = append([]string{"TP_DATABASE=" + dsn, "TP_DATABASE_PASSWORD=" + testpg.Password}, env...)
	first := initTPD(t, policy)
	dirs := []string{first}
	for range n - 1 {
		dir := filepath.Join(t.TempDir(), "tpdata")
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
		dirs = append(dirs, dir)
	}
	var srvs []*server
	for i, dir := range dirs {
		s := startTPD(t, dir, listens[i], env)
		s.mustStop = true
		srvs = append(srvs, s)
	}
	return srvs
}

// checksumServer answers every connection with the SHA-256 of what it read
// until EOF, then size random bytes and their SHA-256.
func checksumServer(t testing.TB, size int64) string {
	return testnet.Serve(t, func(c *net.TCPConn) {
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		fmt.Fprintf(c, "%x\n", h.Sum(nil))
		h.Reset()
		if _, err := io.CopyN(io.MultiWriter(c, h), rand.Reader, size); err != nil {
			return
		}
		fmt.Fprintf(c, "%x", h.Sum(nil))
	})
}

// checksumRoundTrip sends size random bytes through addr to a checksumServer
// and checks both directions' checksums.
func checksumRoundTrip(t *testing.T, addr string, size int64, what string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	checksumConn(t, c.(*net.TCPConn), size, what)
}

// checksumConn is checksumRoundTrip on a connection already open.
func checksumConn(t *testing.T, c interface {
	net.Conn
	CloseWrite() error
}, size int64, what string) {
	t.Helper()
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	up := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(c, up), rand.Reader, size); err != nil {
		t.Fatalf("%s: upload: %v", what, err)
	}
	c.CloseWrite()
	r := bufio.NewReaderSize(c, 1<<20)
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("%s: reading the upload checksum: %v", what, err)
	}
	if got, want := strings.TrimSpace(line), hex.EncodeToString(up.Sum(nil)); got != want {
		t.Fatalf("%s: upload checksum: the service saw %s, sent %s", what, got, want)
	}
	down := sha256.New()
	if _, err := io.CopyN(down, r, size); err != nil {
		t.Fatalf("%s: download: %v", what, err)
	}
	rest, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("%s: download trailer: %v", what, err)
	}
	if got := hex.EncodeToString(down.Sum(nil)); got != string(rest) {
		t.Fatalf("%s: download checksum %s, the service sent %s", what, got, rest)
	}
}

// Three real tpd processes A, B, C on one PostgreSQL. Bob is enrolled on A,
// logs in with the real dlogin on B and dials through C. Alice's agents are
// on A: a protected TCP name, a protected UDP name, a public TCP name and a
// public UDP name; bob reaches each through B and through C, over TLS and
// QUIC, TCP transfers checksummed both ways: B and C carry the sessions to A
// over peer connections. A device certificate on ALPN tp-peer/1 is refused.
// The three instances, one policy, report one policy revision. Revoking bob
// on C ends his live session relayed B→A within seconds.
func TestPGPeerThreeInstances(t *testing.T) {
	parallelLong(t)
	raceTPD(t)
	tcpPort, udpPort := testnet.FreePort(t, "tcp"), testnet.FreePort(t, "udp")
	srvs := startPeers(t, 3, peerPolicy, []string{"TP_PUBLIC_PORTS=" + strconv.Itoa(tcpPort) + "," + strconv.Itoa(udpPort) + "/udp"})
	a, b, c := srvs[0], srvs[1], srvs[2]
	alice := a.login(t, "alice", "laptop")

	// Enroll on A, log in on B, dial through C.
	args := a.enroll(t, "bob", "phone")
	i := slices.Index(args, "--server")
	args[i+1] = b.URL
	bobHome := filepath.Join(t.TempDir(), "tp-home")
	bob := []string{"TP_HOME=" + bobHome}
	if out := run(t, bob, binary("dlogin"), args...); !strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin on B with a token from A:\n%s", out)
	}

	// 1 MiB each way, checksummed, in each of the 8 TCP transfers per agent
	// transport below.
	const size = 1 << 20
	sum := checksumServer(t, size)
	echo := testnet.EchoUDP(t)
	for _, atr := range []string{"tls", "quic"} {
		t.Run("agent-"+atr, func(t *testing.T) {
			env := append(alice, "TP_TRANSPORT="+atr)
			startExpose(t, env, "files", sum, "--allow-user", "bob")
			startExpose(t, env, "dns", echo, "--udp", "--allow-user", "bob")
			web := startExpose(t, env, "web", sum, "--public", strconv.Itoa(tcpPort))
			game := startExpose(t, env, "game", echo, "--udp", "--public", strconv.Itoa(udpPort))
			waitLog(t, web, "Public: anyone reaches", 10*time.Second)
			waitLog(t, game, "Public: anyone reaches UDP", 10*time.Second)
			for _, via := range []*server{c, b} {
				setServer(t, bobHome, via.URL)
				for _, tr := range []string{"tls", "quic"} {
					what := fmt.Sprintf("agent on A over %s, bob on %s over %s", atr, via.Addr, tr)
					benv := append(bob, "TP_TRANSPORT="+tr)
					fwd, _ := startForward(t, benv, "files.rev.tp.internal:22")
					checksumRoundTrip(t, fwd, size, "protected TCP, "+what)
					fwd, _ = startForward(t, benv, "web.rev.tp.internal:80")
					checksumRoundTrip(t, fwd, size, "public TCP, "+what)
					fwd, _ = startForward(t, benv, "dns.rev.tp.internal:53", "--udp")
					udpEchoE2E(t, fwd, "protected UDP, "+what)
					fwd, _ = startForward(t, benv, "game.rev.tp.internal:27015", "--udp")
					udpEchoE2E(t, fwd, "public UDP, "+what)
				}
			}
		})
	}
	for _, s := range []*server{b, c} {
		if !strings.Contains(s.log.String(), `upstream="peer `) {
			t.Fatalf("tpd at %s logged no session carried to a peer:\n%s", s.Addr, s.log.String())
		}
	}
	if n := strings.Count(a.log.String(), `msg="peer session"`); n < 16 {
		t.Fatalf("A logged %d peer sessions; want at least 16 (4 names × 2 instances × 2 carriers × 2 agents)", n)
	}

	// A device certificate on the peer ALPN (bad input: bob's own certificate and key).
	cert, err := tls.LoadX509KeyPair(filepath.Join(bobHome, "cert.pem"), filepath.Join(bobHome, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	rootPEM, err := os.ReadFile(filepath.Join(bobHome, "root.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		t.Fatal("bob's root.pem holds no certificate")
	}
	// A's node certificate names no host: verify its chain to TP's root, as a
	// peer instance does, not a host name.
	verifyChain := func(cs tls.ConnectionState) error {
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		return err
	}
	conn, err := tls.Dial("tcp", a.Addr, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{wire.PeerALPN},
		InsecureSkipVerify: true, // verified by VerifyConnection, against TP's root
		VerifyConnection:   verifyChain})
	if err == nil {
		_, err = conn.Read(make([]byte, 1)) // TLS 1.3: a refused client certificate shows on the first read
		conn.Close()
	}
	if err == nil {
		t.Fatalf("bob's device certificate was accepted on ALPN %s", wire.PeerALPN)
	}
	waitLog(t, a.log, "a device certificate is not", 10*time.Second)

	// One policy, one revision.
	rev := regexp.MustCompile(`policy revision (\S+)`)
	var revs []string
	for _, s := range srvs {
		m := rev.FindStringSubmatch(run(t, nil, binary("tpd"), "status", "--data-dir", s.DataDir))
		if m == nil {
			t.Fatalf("tpd status on %s names no policy revision", s.Addr)
		}
		revs = append(revs, m[1])
	}
	if revs[0] != revs[1] || revs[1] != revs[2] {
		t.Fatalf("three instances with one policy report revisions %q", revs)
	}

	// A live session relayed B→A ends when C revokes bob.
	startExpose(t, append(alice, "TP_TRANSPORT=tls"), "chat", testnet.Echo(t), "--allow-user", "bob")
	setServer(t, bobHome, b.URL)
	fwd, _ := startForward(t, append(bob, "TP_TRANSPORT=tls"), "chat.rev.tp.internal:22")
	live, err := net.Dial("tcp", fwd)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	live.SetDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 64)
	if _, err := live.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(live, buf[:4]); err != nil || string(buf[:4]) != "ping" {
		t.Fatalf("bob's session to chat through B: %q %v", buf[:4], err)
	}
	run(t, nil, binary("tpd"), "revoke", "--device", "bob@phone", "--data-dir", c.DataDir)
	_, err = io.Copy(io.Discard, live)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("bob's session through B to A still runs 30s after C revoked bob")
	}
	waitLog(t, b.log, "revoked", 10*time.Second)
}

// frontDoor is a TCP load balancer in front of tpd instances: each
// connection goes to the first backend that accepts it (with spread, starting
// at the next backend in turn; with sticky, at the backend the last connection
// reached, as a balancer with client affinity does); while shut it accepts and closes connections
// at once (the network between clients and tpd is down). A backend's reset
// reaches the client as a reset, as through a real L4 balancer.
type frontDoor struct {
	ln       net.Listener
	mu       sync.Mutex
	backends []string
	shut     bool
	spread   bool
	sticky   bool
	next     int
}

func newFrontDoor(t *testing.T, backends ...string) *frontDoor {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &frontDoor{ln: ln, backends: backends}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go f.serve(c)
		}
	}()
	return f
}

func (f *frontDoor) set(shut bool) { f.mu.Lock(); f.shut = shut; f.mu.Unlock() }

// mode makes the balancer spread connections over its backends or keep them
// on the one it last reached (see frontDoor).
func (f *frontDoor) mode(spread, sticky bool) {
	f.mu.Lock()
	f.spread, f.sticky = spread, sticky
	f.mu.Unlock()
}

func (f *frontDoor) serve(c net.Conn) {
	defer c.Close()
	f.mu.Lock()
	shut, backends, sticky := f.shut, slices.Clone(f.backends), f.sticky
	if f.spread {
		f.next++
	}
	k := f.next % len(backends)
	backends = append(backends[k:], backends[:k]...)
	f.mu.Unlock()
	if shut {
		return
	}
	for i, b := range backends {
		up, err := net.DialTimeout("tcp", b, 5*time.Second)
		if err != nil {
			continue
		}
		if sticky {
			f.mu.Lock()
			f.next = (k + i) % len(backends)
			f.mu.Unlock()
		}
		defer up.Close()
		go func() {
			if _, err := io.Copy(up, c); err != nil {
				up.(*net.TCPConn).SetLinger(0) // pass the client's reset on
				up.Close()
				return
			}
			up.(*net.TCPConn).CloseWrite()
		}()
		if _, err := io.Copy(c, up); err != nil {
			c.(*net.TCPConn).SetLinger(0) // pass the backend's reset on
		}
		return
	}
}

// kill -9 of the instance A that serves alice's name, with the real binaries
// and a TCP load balancer in front of A, B and C (A first). While the
// balancer lets no connection through, mallory (on C) cannot take the name:
// A's crash released nothing, so the row is still alice's. Once the
// balancer passes connections again, alice's agent reconnects, lands on B
// (A is dead) and takes the name back under a higher epoch, and bob, who
// dials through C all along, reaches it again once the agent's first
// reconnection claimed it (measured: about 0.5 s after the balancer opened;
// the test waits up to 60 s for a loaded machine; docs/SCALE.md states the
// bound).
func TestPGPeerKillServingInstance(t *testing.T) {
	parallel(t)
	raceTPD(t)
	srvs := startPeers(t, 3, peerPolicy+`
allow if {
	input.action == "listen"
	input.identity.user == "mallory"
}
`, nil)
	a, b, c := srvs[0], srvs[1], srvs[2]
	door := newFrontDoor(t, a.Addr, b.Addr, c.Addr)
	alice := a.login(t, "alice", "laptop")
	setServer(t, strings.TrimPrefix(alice[0], "TP_HOME="), "https://"+door.ln.Addr().String())
	bob := c.login(t, "bob", "phone")
	mallory := c.login(t, "mallory", "pc")
	tls := "TP_TRANSPORT=tls"
	expose := startExpose(t, append(alice, tls), "chat", testnet.Echo(t), "--allow-user", "bob")
	dial := func(msg string) (string, error) {
		return runErr(append(bob, tls), strings.NewReader(msg), binary("tp"), "chat.rev.tp.internal", "22")
	}
	if out, err := dial("before"); err != nil || !strings.Contains(out, "before") {
		t.Fatalf("bob through C to chat on A: %v\n%s", err, out)
	}
	if !strings.Contains(a.log.String(), "reverse listener registered") {
		t.Fatalf("alice's agent did not register on A:\n%s", a.log.String())
	}

	door.set(true)
	a.mustStop = false
	a.kill(t)
	out, err := runErr(append(mallory, tls), nil, binary("tp"), "expose", "chat", testnet.Echo(t), "--allow-user", "mallory", "--exit-on-refusal")
	if err == nil || !strings.Contains(out, "another identity") {
		t.Fatalf("mallory claiming chat on C after A was killed: %v\n%q; want it refused (alice holds it)", err, out)
	}
	if out, err := dial("in the gap"); err == nil {
		t.Fatalf("bob reached chat while its agent was cut off: %s", out)
	}

	door.set(false)
	opened := time.Now()
	deadline := opened.Add(60 * time.Second)
	for {
		out, err := dial("after")
		if err == nil && strings.Contains(out, "after") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bob still cannot reach chat 60s after the balancer opened: %v\n%s\nexpose log:\n%s", err, out, expose.String())
		}
		time.Sleep(100 * time.Millisecond) // polling a retry, bounded by the deadline
	}
	waited := time.Since(opened)
	// The baseline of the same run: one dial alone (a tp process, its
	// handshake, the hop to B), which the wait above includes.
	start := time.Now()
	if out, err := dial("baseline"); err != nil || !strings.Contains(out, "baseline") {
		t.Fatalf("bob through C to chat on B: %v\n%s", err, out)
	}
	t.Logf("bob reached chat again %s after the balancer let the agent through (one dial alone: %s)",
		waited.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	if !strings.Contains(b.log.String(), "reverse listener registered") {
		t.Fatalf("alice's agent did not move to B:\n%s", b.log.String())
	}
}
