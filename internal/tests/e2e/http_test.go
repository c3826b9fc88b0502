package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// httpPolicy lets alice and bob serve HTTP apps by name and open public
// ports (listen-tcp); carol may do neither.
const httpPolicy = `package tp.authz

default allow := false

allow if {
	input.action in {"expose_http", "expose_public"}
	input.identity.user in {"alice", "bob"}
}

reason := sprintf("%s may not expose %s", [input.identity.device_id, input.destination.host]) if not allow
`

// appPage is the exposed app's page: its text appears in the DOM only when
// the browser also fetched and ran /app.js through the tunnel.
const appPage = `<!doctype html><html><head><title>exposed app</title></head><body>
<p id="static">Served through a reverse tunnel</p><p id="out">not rendered</p>
<script src="/app.js"></script>
</body></html>`

// startApp runs a local HTTP app (the page and its script) and counts the
// requests it saw that carry what TP sets (X-Forwarded-Proto https, the
// browser's loopback address in X-Forwarded-For, the name in the Host).
func startApp(t *testing.T) (url string, seen *atomic.Int32) {
	t.Helper()
	seen = &atomic.Int32{}
	mux := http.NewServeMux()
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, r *http.Request) {
		if forwarded(r) {
			seen.Add(1)
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprint(w, appPage)
	})
	mux.HandleFunc("/app.js", func(w http.ResponseWriter, r *http.Request) {
		if forwarded(r) {
			seen.Add(1)
		}
		w.Header().Set("Content-Type", "text/javascript")
		fmt.Fprint(w, `document.getElementById("out").textContent = "rendered by " + "app.js";`)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String(), seen
}

// forwarded reports whether r came through TP as docs/HTTP.md §2.6 says.
func forwarded(r *http.Request) bool {
	return r.Header.Get("X-Forwarded-Proto") == "https" && r.Header.Get("X-Forwarded-For") == "127.0.0.1" &&
		r.Host == r.Header.Get("X-Forwarded-Host") && strings.Contains(r.Host, ".rev.tp.internal:")
}

// exposeHTTP is a running `tp expose --http`.
type exposeHTTP struct {
	cmd  *exec.Cmd
	log  *testlog.Buffer
	done chan struct{}
}

// startExposeHTTP runs `tp expose --http` with args and waits for its
// "Serving" line (its first tunnel is up).
func startExposeHTTP(t *testing.T, env []string, args ...string) *exposeHTTP {
	t.Helper()
	x := &exposeHTTP{log: &testlog.Buffer{}, done: make(chan struct{})}
	x.cmd = command(binary("tp"), append([]string{"expose", "--http"}, args...)...)
	x.cmd.Env = append(os.Environ(), env...)
	stderr, err := x.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := x.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		defer close(x.done)
		sc := bufio.NewScanner(stderr)
		sent := false
		for sc.Scan() {
			x.log.Write([]byte(sc.Text() + "\n"))
			if !sent && strings.HasPrefix(sc.Text(), "Serving ") {
				sent = true
				ready <- true
			}
		}
		x.cmd.Wait()
		if !sent {
			ready <- false
		}
	}()
	t.Cleanup(func() {
		x.stop(t)
		if t.Failed() {
			t.Logf("tp expose --http %s log:\n%s", strings.Join(args, " "), x.log.String())
		}
	})
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("tp expose --http exited:\n%s", x.log.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("tp expose --http did not serve within 60s:\n%s", x.log.String())
	}
	return x
}

// stop ends tp expose as Ctrl-C does and waits for it.
func (x *exposeHTTP) stop(t *testing.T) {
	t.Helper()
	x.cmd.Process.Signal(os.Interrupt)
	select {
	case <-x.done:
	case <-time.After(10 * time.Second):
		x.cmd.Process.Kill()
		<-x.done
		t.Errorf("tp expose --http did not stop within 10s of Ctrl-C")
	}
}

// browser is headless Chromium (Debian's) with TP's root trusted through an
// NSS database, as a user who installed it would have.
type browser struct {
	chromium string
	home     string
}

func newBrowser(t testing.TB, rootPEM string) *browser {
	t.Helper()
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is not installed: apt-get install chromium libnss3-tools (deploy/test.sh does, run as root)")
	}
	certutil, err := exec.LookPath("certutil")
	if err != nil {
		t.Fatal("certutil is not installed: apt-get install libnss3-tools (deploy/test.sh does, run as root)")
	}
	b := &browser{chromium: chromium, home: t.TempDir()}
	nssdb := filepath.Join(b.home, ".pki", "nssdb")
	if err := os.MkdirAll(nssdb, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(certutil, "-d", "sql:"+nssdb, "-N", "--empty-password").CombinedOutput(); err != nil {
		t.Fatalf("certutil -N: %v\n%s", err, out)
	}
	if out, err := exec.Command(certutil, "-d", "sql:"+nssdb, "-A", "-t", "C,,", "-n", "TP root", "-i", rootPEM).CombinedOutput(); err != nil {
		t.Fatalf("certutil -A: %v\n%s", err, out)
	}
	return b
}

// dom loads url with host mapped to loopback and returns the DOM after load
// and Chromium's standard error.
func (b *browser) dom(t *testing.T, host, url string) (dom, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := commandContext(ctx, b.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--user-data-dir="+filepath.Join(b.home, "profile"),
		"--host-resolver-rules=MAP "+host+" 127.0.0.1",
		"--dump-dom", url)
	cmd.Env = append(os.Environ(), "HOME="+b.home)
	cmd.SysProcAttr.Setpgid = true // its helpers with it: endBrowser
	var errOut strings.Builder
	cmd.Stderr = &errOut
	out, err := cmd.Output()
	if cmd.Process != nil {
		endBrowser(t, cmd.Process.Pid)
	}
	if err != nil {
		t.Fatalf("chromium %s: %v (after printing %d bytes of DOM)\nstderr:\n%s\nDOM:\n%s", url, err, len(out), errOut.String(), out)
	}
	return string(out), errOut.String()
}

// endBrowser ends what is left of a Chromium started as the leader of its
// own process group (Setpgid) and waits, bounded, until none of its processes
// runs: its renderer and network helpers outlive a browser that was killed,
// for a few milliseconds or, on a loaded machine, longer, and may still be
// writing in its profile when the test's end removes the directory
// ("directory not empty").
func endBrowser(t testing.TB, pgid int) {
	t.Helper()
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	waitFor(t, 30*time.Second, fmt.Sprintf("Chromium's processes (group %d) end after SIGKILL", pgid), func() bool { return !groupRuns(pgid) })
}

// groupRuns reports whether a process of the group pgid is alive and not a
// zombie (a zombie holds no file open; whoever inherited it reaps it).
func groupRuns(pgid int) bool {
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // ended meanwhile
		}
		// pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(string(b[i+1:]))
		if len(fields) >= 3 && fields[2] == strconv.Itoa(pgid) && fields[0] != "Z" && fields[0] != "X" {
			return true
		}
	}
	return false
}

// rendered reports whether dom is appPage after its script ran.
func rendered(dom string) bool {
	return strings.Contains(dom, `<p id="static">Served through a reverse tunnel</p>`) &&
		strings.Contains(dom, `<p id="out">rendered by app.js</p>`)
}

// waitUnserved polls until a handshake for name fails with the TLS alert
// unrecognized_name: tpd no longer serves it.
func waitUnserved(t *testing.T, addr, name string, root *x509.CertPool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
			&tls.Config{ServerName: name, RootCAs: root, NextProtos: []string{"http/1.1"}})
		if err != nil && strings.Contains(err.Error(), "unrecognized name") {
			return
		}
		if err == nil {
			c.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is still served 30s after its exposer stopped (last handshake: %v)", name, err)
		}
		time.Sleep(50 * time.Millisecond) // polling for the tunnels' end, bounded by the deadline above
	}
}

func rootOf(t *testing.T, srv *server) (path string, pool *x509.CertPool) {
	t.Helper()
	path = filepath.Join(srv.DataDir, "ca", "root.crt")
	pem, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return path, pool
}

// Alice exposes a local HTTP app with the real `tp expose --http`; headless
// Chromium, holding no client certificate and trusting TP's root, loads
// https://app.<reverse-zone>:PORT/ by name through tpd and the page renders
// (its script, a second request down the tunnel, ran); tpd logs both
// requests. Bad inputs: bob exposing the same name (held by another identity:
// refused with the holder reason), carol exposing any name (refused with the
// policy's reason); after alice's exposer stops, the name is no longer served
// (the TLS alert unrecognized_name).
func TestHTTPExposeBrowser(t *testing.T) {
	parallel(t)
	srv := startServer(t, httpPolicy)
	rootPEM, root := rootOf(t, srv)
	alice := srv.login(t, "alice", "laptop")
	bob := srv.login(t, "bob", "phone")
	carol := srv.login(t, "carol", "pc")
	appURL, seen := startApp(t)
	const name = "app.rev.tp.internal"
	x := startExposeHTTP(t, alice, "app", appURL)

	_, port, _ := net.SplitHostPort(srv.Addr)
	b := newBrowser(t, rootPEM)
	dom, stderr := b.dom(t, name, "https://"+name+":"+port+"/")
	if !rendered(dom) {
		t.Fatalf("the exposed app did not render (certificate not trusted? script not loaded?):\n%s\nstderr:\n%s", dom, stderr)
	}
	if n := seen.Load(); n < 2 {
		t.Errorf("the app saw %d requests as TP forwards them (X-Forwarded-*, Host), want the page and its script", n)
	}
	logs := srv.log.String()
	for _, path := range []string{"path=/ ", "path=/app.js "} {
		if !strings.Contains(logs, `msg="http request" site=`+name) || !strings.Contains(logs, path) {
			t.Errorf("no access-log line for %s%s in tpd's log:\n%s", name, path, logs)
		}
	}

	out, err := runErr(bob, nil, binary("tp"), "expose", "--http", "app", appURL, "--exit-on-refusal")
	if err == nil || !strings.Contains(out, name+" is held by another identity's reverse tunnels; choose another") {
		t.Errorf("bob exposing %s, which alice holds: %v\n%s\nwant the refusal naming the holder", name, err, out)
	}
	out, err = runErr(carol, nil, binary("tp"), "expose", "--http", "carols", appURL, "--exit-on-refusal")
	if err == nil || !strings.Contains(out, "carol@pc may not expose carols.rev.tp.internal") {
		t.Errorf("carol exposing a name the policy denies her: %v\n%s\nwant the policy's reason", err, out)
	}

	x.stop(t)
	waitUnserved(t, srv.Addr, name, root)
	if dom, _ := b.dom(t, name, "https://"+name+":"+port+"/"); rendered(dom) {
		t.Errorf("the app still renders after its exposer stopped:\n%s", dom)
	}
}

// Bob exposes an app for devices only (tp expose --http --devices-only): the
// handshake asks for the device certificate, so curl with alice's device
// files from dlogin gets the page, while curl without a certificate fails at
// the handshake and headless Chromium (no certificate) gets no page; the app
// sees only alice's request. Once alice's device is revoked (tpd revoke), her
// certificate is refused at the handshake too.
func TestHTTPExposeDevicesOnly(t *testing.T) {
	parallel(t)
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal("curl is not installed: apt-get install curl (deploy/test.sh does)")
	}
	srv := startServer(t, httpPolicy)
	rootPEM, _ := rootOf(t, srv)
	alice := srv.login(t, "alice", "laptop")
	bob := srv.login(t, "bob", "phone")
	appURL, seen := startApp(t)
	const name = "private.rev.tp.internal"
	startExposeHTTP(t, bob, "private", appURL, "--devices-only")
	_, port, _ := net.SplitHostPort(srv.Addr)
	url := "https://" + name + ":" + port + "/"
	resolve := name + ":" + port + ":127.0.0.1"

	home := strings.TrimPrefix(alice[0], "TP_HOME=")
	out, err := runErr(nil, nil, curl, "-sS", "--max-time", "60", "--resolve", resolve, "--cacert", rootPEM,
		"--cert", filepath.Join(home, "cert.pem"), "--key", filepath.Join(home, "key.pem"), url)
	if err != nil || !strings.Contains(out, `<p id="static">Served through a reverse tunnel</p>`) {
		t.Fatalf("curl with alice's device certificate: %v\n%s", err, out)
	}
	if n := seen.Load(); n != 1 {
		t.Errorf("the app saw %d forwarded requests after alice's, want 1", n)
	}
	// curl sends its request right behind its Finished, so the alert may be
	// raced by the reset of the closed connection: tpd's log says why.
	out, err = runErr(nil, nil, curl, "-sS", "--max-time", "60", "--resolve", resolve, "--cacert", rootPEM, url)
	if err == nil || strings.Contains(out, "Served through a reverse tunnel") {
		t.Errorf("curl without a certificate: %v\n%s\nwant the handshake refused", err, out)
	}
	waitLog(t, srv.log, "client didn't provide a certificate", 30*time.Second)
	dom, stderr := newBrowser(t, rootPEM).dom(t, name, url)
	if strings.Contains(dom, "Served through a reverse tunnel") {
		t.Errorf("Chromium without a device certificate got the devices-only page:\n%s\nstderr:\n%s", dom, stderr)
	}
	if n := seen.Load(); n != 1 {
		t.Errorf("the app saw %d forwarded requests, want only alice's", n)
	}

	// Alice's device is revoked: her certificate no longer opens the app.
	run(t, nil, binary("tpd"), "revoke", "--device", "alice@laptop", "--data-dir", srv.DataDir)
	withCert := func() (string, error) {
		return runErr(nil, nil, curl, "-sS", "--max-time", "60", "--resolve", resolve, "--cacert", rootPEM,
			"--cert", filepath.Join(home, "cert.pem"), "--key", filepath.Join(home, "key.pem"), url)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := withCert(); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("alice's revoked device still reaches the devices-only app 30s after tpd revoke")
		}
		time.Sleep(100 * time.Millisecond) // polling for the revocation, bounded by the deadline above
	}
	before := seen.Load()
	if out, err := withCert(); err == nil || seen.Load() != before {
		t.Errorf("curl with a revoked device's certificate: %v, the app saw %d requests more\n%s\nwant the handshake refused and none", err, seen.Load()-before, out)
	}
}

// listenTCP is a client of the draft's listen-tcp path written from
// docs/HTTP.md §2.2 and §2.4 (accept semantics over HTTP/1.1): TLS 1.3 to the
// proxy name with the device certificate dlogin left in home, then
//
//	GET /.well-known/listen-tcp/0.0.0.0/PORT/ HTTP/1.1
//	Host: proxy.localhost
//	Connection: upgrade
//	Upgrade: reverse
//
// It returns the first final answer (after any 100 Continue) and the
// connection, whose bytes after a 101 are those of one public connection.
func listenTCP(addr string, root *x509.CertPool, home string, port int) (*http.Response, *tls.Conn, *bufio.Reader, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(home, "cert.pem"), filepath.Join(home, "key.pem"))
	if err != nil {
		return nil, nil, nil, err
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, &tls.Config{
		ServerName: "proxy.localhost", RootCAs: root, Certificates: []tls.Certificate{cert},
		NextProtos: []string{"http/1.1"}, MinVersion: tls.VersionTLS13,
	})
	if err != nil {
		return nil, nil, nil, err
	}
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	req := fmt.Sprintf("GET /.well-known/listen-tcp/0.0.0.0/%d/ HTTP/1.1\r\nHost: proxy.localhost\r\nConnection: upgrade\r\nUpgrade: reverse\r\n\r\n", port)
	if _, err := io.WriteString(c, req); err != nil {
		c.Close()
		return nil, nil, nil, err
	}
	br := bufio.NewReader(c)
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			c.Close()
			return nil, nil, nil, err
		}
		if resp.StatusCode == http.StatusContinue {
			continue
		}
		return resp, c, br, nil
	}
}

// Alice's device opens a listen-tcp tunnel for a public port (no TP client:
// the request written in the test from docs/HTTP.md) and echoes what the
// port's first connection sends; a client of the public port sends 1 MiB,
// half-closes and gets back the same bytes (SHA-256). Bad inputs: bob asking
// for the port alice holds (403, name_taken, the holder reason), carol asking
// for it against the policy (403, policy_denied, the policy's reason).
func TestHTTPListenTCP(t *testing.T) {
	parallel(t)
	port := testnet.FreePort(t, "tcp")
	srv := startTPD(t, initTPD(t, httpPolicy), "127.0.0.1:0", []string{"TP_PUBLIC_PORTS=" + strconv.Itoa(port)})
	srv.mustStop = true
	_, root := rootOf(t, srv)
	home := func(env []string) string { return strings.TrimPrefix(env[0], "TP_HOME=") }
	alice := home(srv.login(t, "alice", "laptop"))
	bob := home(srv.login(t, "bob", "phone"))
	carol := home(srv.login(t, "carol", "pc"))

	type tunnel struct {
		resp *http.Response
		err  error
	}
	echoed := make(chan tunnel, 1)
	go func() {
		resp, c, br, err := listenTCP(srv.Addr, root, alice, port)
		if err == nil && resp.StatusCode == http.StatusSwitchingProtocols {
			_, err = io.Copy(c, br) // the echo: what the public client sends, until its half-close
			if err == nil {
				err = c.CloseWrite()
			}
			// Wait for tpd's close_notify so the echo is not cut short.
			io.Copy(io.Discard, br)
		}
		if c != nil {
			c.Close()
		}
		echoed <- tunnel{resp, err}
	}()

	// The port opens when alice's request arrives: poll until it accepts. The
	// first accepted connection is the one alice's tunnel relays.
	var pub net.Conn
	deadline := time.Now().Add(60 * time.Second)
	for {
		var err error
		pub, err = net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 5*time.Second)
		if err == nil {
			break
		}
		select {
		case tn := <-echoed:
			t.Fatalf("alice's listen-tcp request ended before the port opened: %v %v\n%s", tn.resp, tn.err, srv.log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("public port %d did not open within 60s of alice's listen-tcp request: %v", port, err)
		}
		time.Sleep(50 * time.Millisecond) // polling for the port, bounded by the deadline above
	}
	defer pub.Close()

	for _, tc := range []struct {
		who, home, code, reason string
	}{
		{"bob", bob, "name_taken", "held by another identity"},
		{"carol", carol, "policy_denied", "carol@pc may not expose"},
	} {
		resp, c, br, err := listenTCP(srv.Addr, root, tc.home, port)
		if err != nil {
			t.Errorf("%s's listen-tcp request for port %d, which alice holds: %v", tc.who, port, err)
			continue
		}
		body, _ := io.ReadAll(io.LimitReader(br, 4096))
		c.Close()
		if resp.StatusCode != http.StatusForbidden || resp.Header.Get("Tp-Refusal") != tc.code || !strings.Contains(string(body), tc.reason) {
			t.Errorf("%s's listen-tcp request for port %d, which alice holds: %s Tp-Refusal %q %q; want 403 %s with %q",
				tc.who, port, resp.Status, resp.Header.Get("Tp-Refusal"), body, tc.code, tc.reason)
		}
	}

	data := make([]byte, 1<<20)
	rand.Read(data)
	pub.SetDeadline(time.Now().Add(2 * time.Minute))
	go func() {
		pub.Write(data)
		pub.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(pub)
	if err != nil || sha256.Sum256(got) != sha256.Sum256(data) {
		t.Errorf("the public connection got %d bytes back (%v), want the 1 MiB it sent, same SHA-256", len(got), err)
	}
	tn := <-echoed
	if tn.err != nil || tn.resp.StatusCode != http.StatusSwitchingProtocols {
		t.Errorf("alice's tunnel: %v %v, want 101 and a clean relay", tn.resp, tn.err)
	} else if h := tn.resp.Header; !strings.Contains(h.Get("Forwarded"), `for="127.0.0.1:`) || !strings.EqualFold(h.Get("Upgrade"), "reverse") {
		t.Errorf("alice's 101 has Forwarded %q, Upgrade %q; want the public client named and Upgrade: reverse (docs/HTTP.md §2.4)", h.Get("Forwarded"), h.Get("Upgrade"))
	}
}

// endBrowser leaves nothing of a process group running: here a shell (the
// leader, as Chromium is) whose child outlives it unless killed with it.
func TestEndBrowserEndsItsGroup(t *testing.T) {
	parallel(t)
	cmd := command("sh", "-c", "sleep 60 & echo $!; wait")
	cmd.SysProcAttr.Setpgid = true
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	child, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("the shell printed %q, not its child's pid", line)
	}
	if !groupRuns(cmd.Process.Pid) {
		t.Fatal("groupRuns sees no process of a group whose leader runs")
	}
	endBrowser(t, cmd.Process.Pid)
	_ = cmd.Wait()
	if groupRuns(cmd.Process.Pid) {
		t.Error("a process of the group still runs after endBrowser")
	}
	if b, err := os.ReadFile("/proc/" + strconv.Itoa(child) + "/stat"); err == nil && !strings.Contains(string(b), ") Z ") {
		t.Errorf("the leader's child (pid %d) outlived endBrowser: %s", child, b)
	}
}
