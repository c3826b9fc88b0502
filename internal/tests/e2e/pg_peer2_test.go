package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// tlsChecksumServer is checksumServer behind TLS with a certificate for name
// (self-signed; roots trusts it): the local service of a pass-through name,
// whose TLS the public client runs end to end.
func tlsChecksumServer(t *testing.T, name string, size int64) (addr string, roots *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots = x509.NewCertPool()
	roots.AddCert(leaf)
	cfg := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}}}
	addr = testnet.Serve(t, func(raw *net.TCPConn) {
		c := tls.Server(raw, cfg)
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Minute))
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
		c.CloseWrite()
	})
	return addr, roots
}

// Public exposures across instances, with two real tpd on one PostgreSQL: A
// listens on 127.0.0.1, B on ::1, so each opens public ports on its own
// address. Alice's agent on A exposes a public TCP port, a public UDP port
// and a pass-through server name. B, told by the database which public
// exposures A serves, opens the same ports on its address and routes the
// server name: a public client reaching B (4 MiB each way over TCP and over
// the pass-through name with TLS end to end, checksummed; UDP echoes) is
// carried to A over a peer connection with the route's epoch. Then the agent
// moves to B: B serves its ports itself (taking over the sockets it kept for
// A), and A, whose agent left, now carries its public clients to B.
func TestPGPeerPublicOnOtherInstance(t *testing.T) {
	parallel(t)
	raceTPD(t)
	tcpPort, udpPort := testnet.FreePort(t, "tcp"), testnet.FreePort(t, "udp")
	srvs := startPeersAt(t, []string{"127.0.0.1:0", "[::1]:0"}, peerPolicy,
		[]string{"TP_PUBLIC_PORTS=" + strconv.Itoa(tcpPort) + "," + strconv.Itoa(udpPort) + "/udp"})
	a, b := srvs[0], srvs[1]
	alice := a.login(t, "alice", "laptop")
	aliceHome := strings.TrimPrefix(alice[0], "TP_HOME=")

	const size = 4 << 20
	const sni = "blog.example.test"
	sum := checksumServer(t, size)
	tlsSum, roots := tlsChecksumServer(t, sni, size)
	echo := testnet.EchoUDP(t)
	publicAt := func(s *server, port int) string {
		host, _, err := net.SplitHostPort(s.Addr)
		if err != nil {
			t.Fatal(err)
		}
		return net.JoinHostPort(host, strconv.Itoa(port))
	}
	check := func(t *testing.T, via *server, what string) {
		t.Helper()
		checksumRoundTrip(t, publicAt(via, tcpPort), size, "public TCP port through "+what)
		udpEchoE2E(t, publicAt(via, udpPort), "public UDP port through "+what)
		c, err := tls.Dial("tcp", via.Addr, &tls.Config{ServerName: sni, RootCAs: roots})
		if err != nil {
			t.Fatalf("TLS to %s through %s: %v", sni, what, err)
		}
		checksumConn(t, c, size, "pass-through name through "+what)
	}
	expose := func(t *testing.T, on *server) {
		env := append(alice, "TP_TRANSPORT=tls")
		setServer(t, aliceHome, on.URL)
		web := startExpose(t, env, "web", sum, "--public", strconv.Itoa(tcpPort))
		game := startExpose(t, env, "game", echo, "--udp", "--public", strconv.Itoa(udpPort))
		blog := startExpose(t, env, "blog", tlsSum, "--public-sni", sni)
		waitLog(t, web, "Public: anyone reaches", 30*time.Second)
		waitLog(t, game, "Public: anyone reaches UDP", 30*time.Second)
		waitLog(t, blog, "Public: anyone reaches", 30*time.Second)
	}

	t.Run("agent-on-A", func(t *testing.T) {
		expose(t, a)
		for _, k := range []string{"TCP port " + strconv.Itoa(tcpPort), "UDP port " + strconv.Itoa(udpPort)} {
			waitLog(t, b.log, `exposure="public `+k+`"`, 30*time.Second)
		}
		check(t, a, "A, the agent's instance")
		check(t, b, "B, carried to A")
		// TCP and pass-through sessions are logged when they end (UDP ones
		// when idle): B names A as the agent's side, A logs the peer sessions.
		// Nothing but B listens on ::1, so the UDP echo came through B.
		waitLog(t, b.log, `exposure="public TCP port `+strconv.Itoa(tcpPort)+`" agent="peer `+instanceOf(t, a), 10*time.Second)
		waitLog(t, b.log, `exposure="public server name `+sni+`" agent="peer `+instanceOf(t, a), 10*time.Second)
		waitLog(t, a.log, `msg="peer session" peer=`+instanceOf(t, b)+` name=tcp/`+strconv.Itoa(tcpPort), 10*time.Second)
		waitLog(t, a.log, `msg="peer session" peer=`+instanceOf(t, b)+` name=sni/`+sni, 10*time.Second)
	})
	t.Run("agent-on-B", func(t *testing.T) {
		// The agents of the last subtest were stopped; alice's agent now on B.
		expose(t, b)
		check(t, b, "B, the agent's instance now")
		check(t, a, "A, carried to B")
		waitLog(t, a.log, `exposure="public TCP port `+strconv.Itoa(tcpPort)+`" agent="peer `+instanceOf(t, b), 10*time.Second)
		waitLog(t, a.log, `exposure="public server name `+sni+`" agent="peer `+instanceOf(t, b), 10*time.Second)
	})
}

// instanceOf is the instance name s logged at start (its row in tp_instances).
func instanceOf(t *testing.T, s *server) string {
	t.Helper()
	waitLog(t, s.log, "peering with the other instances", 30*time.Second)
	l := s.log.String()
	i := strings.Index(l, "peering with the other instances")
	line := l[i:]
	line = line[:strings.IndexByte(line, '\n')]
	_, rest, ok := strings.Cut(line, "instance=")
	if !ok {
		t.Fatalf("no instance= in %q", line)
	}
	name, _, _ := strings.Cut(rest, " ")
	return strings.Trim(name, `"`)
}

// An HTTP app exposed with the real `tp expose --http` on instance A is served
// through instance B's website: Go's net/http client, trusting TP's root,
// fetches https://app.<zone>/ from B (the page), downloads 4 MiB and uploads 4
// MiB, both checksummed; B proxies each request to A over a peer connection
// (B's access log names the site, A logs the peer session with the status).
// Once the exposer stops, B answers 404 as for a name nobody exposes.
func TestPGPeerHTTPOnOtherInstance(t *testing.T) {
	parallel(t)
	raceTPD(t)
	srvs := startPeers(t, 2, httpPolicy, nil)
	a, b := srvs[0], srvs[1]
	alice := a.login(t, "alice", "laptop")
	blob := make([]byte, 4<<20)
	rand.Read(blob)
	blobSum := fmt.Sprintf("%x", sha256.Sum256(blob))
	mux := http.NewServeMux()
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, appPage) })
	mux.HandleFunc("/blob", func(w http.ResponseWriter, r *http.Request) { w.Write(blob) })
	mux.HandleFunc("/sum", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		if _, err := io.Copy(h, r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%x", h.Sum(nil))
	})
	app := httptest.NewServer(mux)
	t.Cleanup(app.Close)
	const name = "app.rev.tp.internal"
	x := startExposeHTTP(t, alice, "app", app.URL)

	_, root := rootOf(t, a)
	client := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: root},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, b.Addr) // name → B, as DNS would
		},
	}}
	_, port, _ := net.SplitHostPort(b.Addr)
	base := "https://" + name + ":" + port
	get := func(path string) (int, []byte) {
		t.Helper()
		resp, err := client.Get(base + path)
		if err != nil {
			t.Fatalf("GET %s through B: %v", path, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("GET %s through B: reading the body: %v", path, err)
		}
		return resp.StatusCode, body
	}
	if status, body := get("/"); status != http.StatusOK || string(body) != appPage {
		t.Fatalf("the page through B: %d %q", status, body)
	}
	if status, body := get("/blob"); status != http.StatusOK || fmt.Sprintf("%x", sha256.Sum256(body)) != blobSum {
		t.Fatalf("4 MiB download through B: status %d, %d bytes, checksum mismatch", status, len(body))
	}
	up := make([]byte, 4<<20)
	rand.Read(up)
	resp, err := client.Post(base+"/sum", "application/octet-stream", bytes.NewReader(up))
	if err != nil {
		t.Fatalf("4 MiB upload through B: %v", err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || string(got) != fmt.Sprintf("%x", sha256.Sum256(up)) {
		t.Fatalf("4 MiB upload through B: %d %q %v; want the upload's checksum", resp.StatusCode, got, err)
	}
	waitLog(t, b.log, `msg="http request" site=`+name, 10*time.Second)
	waitLog(t, a.log, `name=`+name, 10*time.Second)
	waitLog(t, a.log, `http_status=200`, 10*time.Second)

	x.stop(t)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get(base + "/")
		if err != nil && strings.Contains(err.Error(), "unrecognized name") {
			break // no certificate served for it any more
		}
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusNotFound {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still served through B 30s after its exposer stopped: %v %v", name, resp, err)
		}
		time.Sleep(100 * time.Millisecond) // polling, bounded by the deadline
	}
}

// An agent over TLS whose pickups land on another instance: alice's `tp
// expose` reaches A through a TCP balancer and registers there; then the
// balancer sends every new connection to B, so each session A announces is
// picked up on B, which does not hold the agent's control session. B finds
// the instance that serves alice's device in the database and hands the
// pickup to A over a peer connection, and bob's dials (through A, and through
// B, which carries the dial to A and then the pickup back) complete with 4
// MiB each way checksummed. Without this, B refused the pickup
// (unknown_session) and bob got reverse_timeout.
func TestPGPeerPickupOnOtherInstance(t *testing.T) {
	parallel(t)
	raceTPD(t)
	srvs := startPeers(t, 2, peerPolicy, nil)
	a, b := srvs[0], srvs[1]
	door := newFrontDoor(t, a.Addr)
	alice := a.login(t, "alice", "laptop")
	setServer(t, strings.TrimPrefix(alice[0], "TP_HOME="), "https://"+door.ln.Addr().String())
	bob := a.login(t, "bob", "phone")
	bobHome := strings.TrimPrefix(bob[0], "TP_HOME=")
	const size = 4 << 20
	sum := checksumServer(t, size)
	startExpose(t, append(alice, "TP_TRANSPORT=tls"), "files", sum, "--allow-user", "bob")
	waitLog(t, a.log, "reverse listener registered", 30*time.Second)
	// A first session while the balancer still sends alice to A: her agent
	// gets its certificate for files (ACME, on A; on B it works too:
	// TestPGACMEOnOtherInstance).
	setServer(t, bobHome, a.URL)
	fwd, _ := startForward(t, append(bob, "TP_TRANSPORT=tls"), "files.rev.tp.internal:22", "--no-e2e-mux")
	checksumRoundTrip(t, fwd, size, "bob through A, the agent's pickup through A")
	door.mu.Lock()
	door.backends = []string{b.Addr} // from now on every pickup lands on B
	door.mu.Unlock()
	for _, via := range []*server{a, b} {
		setServer(t, bobHome, via.URL)
		// A session of its own per connection (no end-to-end carrier, which
		// would carry them all on the first dial's pickup): every dial here is
		// a pickup of its own, and its log line comes at its end.
		fwd, _ := startForward(t, append(bob, "TP_TRANSPORT=tls"), "files.rev.tp.internal:22", "--no-e2e-mux")
		checksumRoundTrip(t, fwd, size, "bob through "+via.Addr+", the agent's pickup through B")
	}
	waitLog(t, b.log, `upstream="peer `+instanceOf(t, a), 10*time.Second)
	waitLog(t, b.log, `dest="accept `, 10*time.Second)
	waitLog(t, a.log, `agent=alice@laptop`, 10*time.Second)
	if strings.Contains(b.log.String(), "unknown_session") {
		t.Fatalf("B refused a pickup it should have handed to A:\n%s", b.log.String())
	}
}

// The drain's reason across a peer hop: bob's `tp` session reaches alice's
// agent on A through B. A is stopped (SIGTERM, shutdown-timeout 2 s): when its
// drain runs out it cuts the session, and first tells B why, so bob's tp exits
// with the shutdown reason ("the TP server instance that served … is shutting
// down"), not a bare reset (peer_reset), and never as a clean end.
func TestPGPeerDrainReasonAcrossHop(t *testing.T) {
	parallel(t)
	raceTPD(t)
	srvs := startPeers(t, 2, peerPolicy, []string{"TP_SHUTDOWN_TIMEOUT=2s"})
	a, b := srvs[0], srvs[1]
	a.mustStop = false
	alice := a.login(t, "alice", "laptop")
	bob := a.login(t, "bob", "phone")
	setServer(t, strings.TrimPrefix(bob[0], "TP_HOME="), b.URL)
	startExpose(t, append(alice, "TP_TRANSPORT=tls"), "chat", testnet.Echo(t), "--allow-user", "bob")
	waitLog(t, a.log, "reverse listener registered", 30*time.Second)

	cmd := command(binary("tp"), "chat.rev.tp.internal", "22")
	cmd.Env = append(os.Environ(), append(bob, "TP_TRANSPORT=tls")...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &testlog.Buffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	echoed := make(chan string, 1)
	exited := make(chan error, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		echoed <- line
		io.Copy(io.Discard, stdout)
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() { cmd.Process.Kill() })
	if _, err := stdin.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	select { // the session is up: the echo came back through B and A
	case line := <-echoed:
		if line != "ping\n" {
			t.Fatalf("bob's session through B to chat on A echoed %q\n%s", line, stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("no echo through B to chat on A within 60s:\n%s", stderr.String())
	}
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err = <-exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("bob's tp still runs 60s after A was stopped with a 2s shutdown-timeout:\n%s", stderr.String())
	}
	if err == nil {
		t.Fatalf("bob's tp ended cleanly when A cut its session: a cut must be an error\n%s", stderr.String())
	}
	if !strings.Contains(stderr.String(), "(shutdown)") || !strings.Contains(stderr.String(), "is shutting down") {
		t.Fatalf("bob's tp did not report the shutdown that cut its session across the peer hop:\n%s\nB's log:\n%s", stderr.String(), b.log.String())
	}
	waitLog(t, b.log, "peer session ended by its serving instance", 10*time.Second)
}
