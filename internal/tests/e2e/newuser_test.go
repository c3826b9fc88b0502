package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// Messages a new user meets, with the real binaries: each once said something
// misleading (the old words are in the comments).
func TestNewUserMessages(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)

	t.Run("enroll names the time zone", func(t *testing.T) {
		// Was "valid until 2026-12-03 08:25:55." (which zone?).
		out := run(t, nil, binary("tpd"), "enroll", "frank", "--device", "laptop", "--data-dir", srv.DataDir)
		if !regexp.MustCompile(`valid until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Za-z+-][A-Za-z0-9+-]*\.`).MatchString(out) {
			t.Errorf("tpd enroll's expiry has no time zone:\n%s", out)
		}
	})

	t.Run("a failed first dlogin leaves no TP_HOME", func(t *testing.T) {
		// Bad input: a wrong fingerprint. Once left an empty TP_HOME behind.
		args := srv.enroll(t, "grace", "laptop")
		for i, a := range args {
			if strings.HasPrefix(a, "SHA256:") {
				args[i] = "SHA256:" + strings.Repeat("00", 32)
			}
		}
		home := filepath.Join(t.TempDir(), "tp-home")
		expectFail(t, []string{"TP_HOME=" + home}, "wrong fingerprint", []string{"refusing it"}, binary("dlogin"), args...)
		if _, err := os.Lstat(home); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the failed dlogin left %s behind (%v)", home, err)
		}
	})

	t.Run("server not running", func(t *testing.T) {
		// Nothing listens at the profile's address. tp once said "no answer
		// over UDP; is UDP blocked on this network?".
		env := srv.login(t, "alice", "desk")
		home := strings.TrimPrefix(env[0], "TP_HOME=")
		profile := filepath.Join(home, "profile.json")
		b, err := os.ReadFile(profile)
		if err != nil {
			t.Fatal(err)
		}
		dead := "https://" + testnet.Refusing(t)
		if err := os.WriteFile(profile, []byte(strings.Replace(string(b), srv.URL, dead, 1)), 0o600); err != nil {
			t.Fatal(err)
		}
		out := expectFail(t, env, "tpd not running", []string{"nothing listens there", "is tpd running"}, binary("tp"), "127.0.0.1", "22")
		if strings.Contains(out, "UDP") {
			t.Errorf("tp blames UDP for a server that is not running:\n%s", out)
		}
	})

	t.Run("server address speaks no TLS", func(t *testing.T) {
		// Bad input: the profile's address is a plain HTTP server's port. tp
		// once said "TLS handshake with TP server ADDR: tls: first record does
		// not look like a TLS handshake", beside QUIC's "no answer over UDP".
		env := srv.login(t, "alice", "notebook")
		home := strings.TrimPrefix(env[0], "TP_HOME=")
		profile := filepath.Join(home, "profile.json")
		b, err := os.ReadFile(profile)
		if err != nil {
			t.Fatal(err)
		}
		web := httptest.NewServer(http.NotFoundHandler())
		defer web.Close()
		addr := web.Listener.Addr().String()
		if err := os.WriteFile(profile, []byte(strings.Replace(string(b), srv.URL, "https://"+addr, 1)), 0o600); err != nil {
			t.Fatal(err)
		}
		out := expectFail(t, env, "plain HTTP port", []string{addr + " does not speak TLS", `it answered "HTTP/1.`, "is this tpd's port?"}, binary("tp"), "127.0.0.1", "22")
		for _, bad := range []string{"UDP", "tls: first record"} {
			if strings.Contains(out, bad) {
				t.Errorf("tp's message for a port that speaks no TLS has %q:\n%s", bad, out)
			}
		}
	})

	t.Run("revoked device", func(t *testing.T) {
		// tp once said "most likely the client certificate … run dlogin".
		env := srv.login(t, "alice", "phone")
		run(t, nil, binary("tpd"), "revoke", "--device", "alice@phone", "--data-dir", srv.DataDir)
		for _, transport := range []string{"quic", "tls"} {
			out := expectFail(t, env, "revoked over "+transport, []string{"alice@phone", "is revoked on the TP server", "ask your TP administrator"},
				binary("tp"), "--transport", transport, "127.0.0.1", "22")
			if strings.Contains(out, "run dlogin") {
				t.Errorf("tp tells a revoked device to run dlogin:\n%s", out)
			}
		}
	})

	t.Run("quiet, and a hang-up ends silently", func(t *testing.T) {
		// Every ssh once showed "Connecting to …" and, when ssh hung up its
		// ProxyCommand at exit, "tp: hangup signal received".
		env := srv.login(t, "alice", "tablet")
		addr := testnet.Serve(t, func(c *net.TCPConn) {
			fmt.Fprintf(c, "SSH-2.0-test\r\n")
			_, _ = c.Read(make([]byte, 1)) // until tp goes
		})
		_, port, _ := net.SplitHostPort(addr)
		cmd := command(binary("tp"), "-q", "127.0.0.1", port)
		cmd.Env = append(os.Environ(), env...)
		stderr := &testlog.Buffer{}
		cmd.Stderr = stderr
		stdinR, stdinW, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer stdinW.Close()
		cmd.Stdin = stdinR
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		stdinR.Close()
		defer cmd.Process.Kill()
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err != nil || !strings.HasPrefix(line, "SSH-2.0-test") {
			t.Fatalf("tp -q relayed %q, %v; stderr:\n%s", line, err, stderr.String())
		}
		if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("tp exited with %v after ssh's hang-up; want 0", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("tp did not exit within 30s of SIGHUP")
		}
		if s := stderr.String(); s != "" {
			t.Errorf("tp -q printed to stderr:\n%s", s)
		}
	})
}

// Bad input: tpd serve's first start on a port another process holds. It once
// created the data dir (CA and all) and only then failed.
func TestBusyPortCreatesNoDataDir(t *testing.T) {
	parallel(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dir := filepath.Join(t.TempDir(), "tpdata")
	expectFail(t, nil, "busy port", []string{"already listening"}, binary("tpd"), "serve", "--data-dir", dir, "--listen", ln.Addr().String())
	if _, err := os.Lstat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("tpd serve on a busy port left %s behind (%v)", dir, err)
	}
}

// An agent serving a public UDP port whose user is revoked learns it from the
// server and exits saying so. It once kept retrying for ever with "most likely
// the client certificate … run dlogin".
func TestRevokedPublicUDPAgentExits(t *testing.T) {
	parallel(t)
	port := testnet.FreePort(t, "udp")
	srv := startServer(t, reverseUDPPolicy, "TP_PUBLIC_PORTS="+strconv.Itoa(port)+"/udp")
	echo := testnet.EchoUDP(t)
	alice := srv.login(t, "alice", "laptop")
	a := startAgentProc(t, alice, "game", echo, "--udp", "--public", strconv.Itoa(port))
	a.waitRegistered(t)
	run(t, nil, binary("tpd"), "revoke", "--user", "alice", "--data-dir", srv.DataDir)
	log := a.waitExit(t)
	if !strings.Contains(log, "is revoked on the TP server") || strings.Contains(log, "run dlogin") {
		t.Errorf("the revoked agent's last words do not say it is revoked:\n%s", log)
	}
	if code := a.cmd.ProcessState.ExitCode(); code == 0 {
		t.Errorf("the revoked agent exited 0")
	}
}
