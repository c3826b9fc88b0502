package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// expectFail runs a command that must exit non-zero and say every one of want.
func expectFail(t *testing.T, env []string, what string, want []string, name string, args ...string) string {
	t.Helper()
	out, err := runErr(env, nil, name, args...)
	if err == nil {
		t.Errorf("%s: %s %s exited 0; want a failure:\n%s", what, filepath.Base(name), strings.Join(args, " "), out)
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("%s: output does not say %q:\n%s", what, w, out)
		}
	}
	return out
}

// usersLine returns the line of `tpd users` for user's device.
func usersLine(t *testing.T, s *server, user, device string) string {
	t.Helper()
	out := run(t, nil, binary("tpd"), "users", "--data-dir", s.DataDir)
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == user && f[2] == device {
			return line
		}
	}
	t.Fatalf("tpd users lists no %s@%s:\n%s", user, device, out)
	return ""
}

var revokedSince = regexp.MustCompile(`revoked.* since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d`)

// Administrative acts never silently do nothing, with the real binaries: a
// revocation naming nobody fails and says how to list what exists, `tpd users`
// shows revocations with their time, and `tp whoami` never says "valid" for a
// certificate the server refuses, nor when it cannot ask the server.
func TestAdminActsNeverSilent(t *testing.T) {
	parallel(t)
	s := startServer(t, testPolicy)
	alice := s.login(t, "alice", "laptop", "dev")
	bob := s.login(t, "bob", "phone")
	carol := s.login(t, "carol", "pc")
	tpd := binary("tpd")
	dd := []string{"--data-dir", s.DataDir}

	// Bad input: names that do not exist. Nothing may be put on the list.
	expectFail(t, nil, "typo in a device ID", []string{"zed@nowhere", "tpd users"}, tpd, append([]string{"revoke", "--device", "zed@nowhere"}, dd...)...)
	expectFail(t, nil, "unknown device of a known user", []string{"alice@lapto", "tpd users"}, tpd, append([]string{"revoke", "--device", "alice@lapto"}, dd...)...)
	expectFail(t, nil, "unknown user", []string{"zed", "tpd users"}, tpd, append([]string{"revoke", "--user", "zed"}, dd...)...)
	expectFail(t, nil, "serial the CA never issued", []string{"deadbeef", "tp whoami"}, tpd, append([]string{"revoke", "--serial", "dead:beef"}, dd...)...)
	expectFail(t, nil, "removing an entry that is not on the list", []string{"not on the deny list", "tpd revoke --list"}, tpd, append([]string{"revoke", "--device", "alice@laptop", "--remove"}, dd...)...)
	if out := run(t, nil, tpd, append([]string{"revoke", "--list"}, dd...)...); strings.Count(strings.TrimSpace(out), "\n") != 0 {
		t.Errorf("failed revocations left entries on the deny list:\n%s", out)
	}

	// Before any revocation the server confirms alice's certificate.
	out := run(t, alice, binary("tp"), "whoami")
	if !strings.Contains(out, "Status:      valid") {
		t.Fatalf("tp whoami for a good device:\n%s", out)
	}
	m := regexp.MustCompile(`Certificate: serial ([0-9a-f]+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("tp whoami prints no serial:\n%s", out)
	}

	// Bad state: alice's current certificate revoked by serial. whoami must
	// say the server refuses it, not "valid".
	if out := run(t, nil, tpd, append([]string{"revoke", "--serial", m[1]}, dd...)...); !strings.Contains(out, "alice@laptop") {
		t.Errorf("revoking alice's serial does not name her device:\n%s", out)
	}
	out = expectFail(t, alice, "whoami with a serial-revoked certificate", []string{"REFUSED", m[1]}, binary("tp"), "whoami")
	if strings.Contains(out, "Status:      valid") {
		t.Errorf("tp whoami says valid for a revoked certificate:\n%s", out)
	}

	// Bad state: the device revoked. tpd users shows it with the time; whoami says REVOKED.
	run(t, nil, tpd, append([]string{"revoke", "--device", "alice@laptop"}, dd...)...)
	if line := usersLine(t, s, "alice", "laptop"); !revokedSince.MatchString(line) {
		t.Errorf("tpd users does not show alice@laptop as revoked with a time: %q", line)
	}
	out = expectFail(t, alice, "whoami of a revoked device", []string{"REVOKED"}, binary("tp"), "whoami")
	if strings.Contains(out, "Status:      valid") {
		t.Errorf("tp whoami says valid for a revoked device:\n%s", out)
	}
	// Revoking it again changes nothing and says so.
	if out := run(t, nil, tpd, append([]string{"revoke", "--device", "alice@laptop"}, dd...)...); !strings.Contains(out, "was already revoked") {
		t.Errorf("revoking a revoked device again:\n%s", out)
	}

	// Bad state: a whole user revoked. Every device of the user shows it.
	run(t, nil, tpd, append([]string{"revoke", "--user", "bob"}, dd...)...)
	if line := usersLine(t, s, "bob", "phone"); !revokedSince.MatchString(line) || !strings.Contains(line, "user") {
		t.Errorf("tpd users does not show bob@phone as revoked with its user: %q", line)
	}
	out = expectFail(t, bob, "whoami of a revoked user's device", []string{"REVOKED"}, binary("tp"), "whoami")
	if strings.Contains(out, "Status:      valid") {
		t.Errorf("tp whoami says valid for a revoked user:\n%s", out)
	}
	list := run(t, nil, tpd, append([]string{"revoke", "--list"}, dd...)...)
	for _, w := range []string{"user    bob", "device  alice@laptop", "serial  " + m[1]} {
		if !strings.Contains(list, w) {
			t.Errorf("tpd revoke --list has no %q:\n%s", w, list)
		}
	}
	if line := usersLine(t, s, "carol", "pc"); strings.Contains(line, "revoked") {
		t.Errorf("carol, never revoked, is listed as revoked: %q", line)
	}

	// Bad state: the server cannot be reached (carol's profile points at a
	// closed port). whoami says so instead of "valid".
	home := strings.TrimPrefix(carol[0], "TP_HOME=")
	pf := filepath.Join(home, "profile.json")
	b, err := os.ReadFile(pf)
	if err != nil {
		t.Fatal(err)
	}
	dead := "https://" + testnet.Refusing(t)
	if err := os.WriteFile(pf, []byte(strings.Replace(string(b), s.URL, dead, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	out = expectFail(t, carol, "whoami with the server unreachable", []string{"NOT CONFIRMED", "cannot reach the TP server", "nothing listens there"}, binary("tp"), "whoami")
	if strings.Contains(out, "Status:      valid") {
		t.Errorf("tp whoami says valid without asking the server:\n%s", out)
	}
}
