package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// TestJSONLogEveryLine runs the real tpd with log-format json and the audit
// log on stdout (TP_AUDIT_LOG=-), enrolls a device, tunnels through it, has a
// dial denied, asks `tpd status`, and stops it with SIGTERM. Bad input: none;
// what is checked is that every line tpd printed, on stdout and on stderr,
// banner and notes included, parses as a JSON object, and that the audit lines
// of the session and the denial are among them.
func TestJSONLogEveryLine(t *testing.T) {
	parallel(t)
	dataDir := filepath.Join(t.TempDir(), "tpdata")
	run(t, nil, binary("tpd"), "init", "--data-dir", dataDir)
	if err := os.WriteFile(filepath.Join(dataDir, "policy", "tp.rego"), []byte(testPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := command(tpdServe(t), "serve", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--log-format", "json")
	cmd.Env = append(os.Environ(), "TP_AUDIT_LOG=-")
	stdout, stderr := &testlog.Buffer{}, &testlog.Buffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		if t.Failed() {
			t.Logf("tpd stdout:\n%s\ntpd stderr:\n%s", stdout.String(), stderr.String())
		}
	})

	// The banner is JSON: find the address and fingerprint in it.
	var url, fingerprint string
	deadline := time.Now().Add(60 * time.Second)
	for url == "" || fingerprint == "" {
		if time.Now().After(deadline) {
			t.Fatal("tpd printed no JSON banner within 60s")
		}
		select {
		case err := <-exited:
			t.Fatalf("tpd exited before it was ready: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
		for _, l := range jsonLines(t, "stdout", stdout.String(), false) {
			switch l["msg"] {
			case "tpd listening":
				url, _ = l["url"].(string)
			case "CA fingerprint":
				fingerprint, _ = l["fingerprint"].(string)
			}
		}
	}
	srv := &server{DataDir: dataDir, URL: url, Fingerprint: fingerprint, log: stderr}
	alice := srv.login(t, "alice", "laptop")
	bob := srv.login(t, "bob", "pc")

	echo := testnet.Echo(t)
	host, port, _ := net.SplitHostPort(echo)
	out, err := runErr(alice, strings.NewReader("ping"), binary("tp"), "-q", host, port)
	if err != nil || !strings.Contains(out, "ping") {
		t.Fatalf("tp through tpd: %v\n%s", err, out)
	}
	if out, err := runErr(bob, strings.NewReader("ping"), binary("tp"), "-q", host, port); err == nil {
		t.Fatalf("bob's dial was allowed:\n%s", out)
	}
	if st := run(t, nil, binary("tpd"), "status", "--data-dir", dataDir); !strings.Contains(st, "RECENT DENIALS (1") || !strings.Contains(st, "bob@pc") {
		t.Fatalf("tpd status does not show bob's denial:\n%s", st)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("tpd exited with %v after SIGTERM", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("tpd did not stop within 30s of SIGTERM")
	}
	var sawAllowed, sawDenied bool
	for _, l := range jsonLines(t, "stdout", stdout.String(), true) {
		if l["kind"] != "session" {
			continue
		}
		sawAllowed = sawAllowed || l["identity"] == "alice@laptop" && l["decision"] == "allow" && l["destination"] == echo && l["bytes_up"] == 4.0
		sawDenied = sawDenied || l["identity"] == "bob@pc" && l["decision"] == "deny" && l["end_code"] == "policy_denied"
	}
	if !sawAllowed || !sawDenied {
		t.Fatalf("audit lines on stdout: allowed session %v, denied session %v; want both", sawAllowed, sawDenied)
	}
	if len(jsonLines(t, "stderr", stderr.String(), true)) == 0 {
		t.Fatal("tpd logged nothing on stderr")
	}
}

// jsonLines parses out line by line. With strict, a line that is not a JSON
// object fails the test; otherwise (output still being written) such a line
// is skipped.
func jsonLines(t *testing.T, name, out string, strict bool) []map[string]any {
	t.Helper()
	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			if strict {
				t.Fatalf("tpd printed a line on %s that is not JSON: %q (%v)", name, sc.Text(), err)
			}
			continue
		}
		lines = append(lines, m)
	}
	return lines
}

// TestJSONLogStopError: with log-format json, the error tpd serve stops with is
// a JSON line too. Bad input: the public port is taken by another listener.
func TestJSONLogStopError(t *testing.T) {
	parallel(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := command(tpdServe(t), "serve", "--data-dir", filepath.Join(t.TempDir(), "tpdata"), "--listen", ln.Addr().String(), "--log-format", "json")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("tpd serve on a busy port: %v; want exit status 1\n%s", err, stderr.String())
	}
	lines := jsonLines(t, "stderr", stderr.String(), true)
	jsonLines(t, "stdout", stdout.String(), true)
	if len(lines) != 1 || lines[0]["level"] != "ERROR" || !strings.Contains(fmt.Sprint(lines[0]["err"]), "already listening") {
		t.Fatalf("stderr %q; want one JSON error line saying the port is taken", stderr.String())
	}
}
