package deploy

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const unitFile = "systemd/tpd.service"

// unit is a parsed systemd unit: section -> key -> values in order.
type unit map[string]map[string][]string

func parseUnit(t *testing.T, text string) unit {
	t.Helper()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && line[len(line)-1] == ']':
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: %q is neither a section nor key=value", unitFile, n, line)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// one returns the single value of key in section, failing when it is absent or repeated.
func (u unit) one(t *testing.T, section, key string) string {
	t.Helper()
	v := u[section][key]
	if len(v) != 1 {
		t.Fatalf("%s: [%s] %s= is set %d times, want once", unitFile, section, key, len(v))
	}
	return v[0]
}

// verifyUnit runs systemd-analyze verify on text saved as tpd.service and
// returns what it printed: it exits 0 on unknown keys and bad values, which
// it only reports, so any output at all is a finding.
func verifyUnit(t *testing.T, text string) (string, error) {
	t.Helper()
	if testing.Short() {
		t.Skip("runs systemd-analyze (Debian's systemd); skipped under -short")
	}
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze is not installed; the test script installs it as root (Debian/Ubuntu: apt-get install systemd): %v", err)
	}
	path := filepath.Join(t.TempDir(), "tpd.service")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, analyze, "verify", "--man=no", path).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// The unit passes systemd-analyze verify with the real tpd at ExecStart (the
// release build stands in for /usr/local/bin/tpd, which verify requires to
// exist), and a misspelt key in it would be caught (bad input: TimeoutStopSecs=).
func TestSystemdUnitVerifies(t *testing.T) {
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	const installed = "/usr/local/bin/tpd"
	text := string(b)
	if n := strings.Count(text, "ExecStart="+installed+" "); n != 1 {
		t.Fatalf("%s: want one ExecStart=%s …, found %d", unitFile, installed, n)
	}
	text = strings.ReplaceAll(text, "ExecStart="+installed+" ", "ExecStart="+filepath.Join(released(t), "tpd")+" ")
	if out, err := verifyUnit(t, text); err != nil || out != "" {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unitFile, err, out)
	}
	misspelt := strings.Replace(text, "TimeoutStopSec=", "TimeoutStopSecs=", 1)
	if misspelt == text {
		t.Fatalf("%s sets no TimeoutStopSec", unitFile)
	}
	if out, err := verifyUnit(t, misspelt); err == nil && !strings.Contains(out, "TimeoutStopSecs") {
		t.Fatalf("systemd-analyze verify said nothing of a misspelt key; this check would miss one (output %q)", out)
	}
}

// What verify does not judge: the unit runs tpd as a dynamic user (no User= or
// Group= beside DynamicUser=, which made systemd use a static account "tp"),
// waits for tpd's READY=1 (Type=notify), reloads with a signal tpd handles,
// waits longer than a drain before SIGKILL, points TP_DATA_DIR at its
// StateDirectory, and starts tpd with flags tpd accepts.
func TestSystemdUnitSettings(t *testing.T) {
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	u := parseUnit(t, string(b))
	svc := u["Service"]
	if svc == nil {
		t.Fatalf("%s has no [Service] section", unitFile)
	}
	if u.one(t, "Service", "DynamicUser") == "yes" {
		for _, k := range []string{"User", "Group"} {
			if v, ok := svc[k]; ok {
				t.Errorf("%s: %s=%s beside DynamicUser=yes: if that account exists systemd runs tpd as it, not as a dynamic user", unitFile, k, v[0])
			}
		}
	}
	if got := u.one(t, "Service", "Type"); got != "notify" {
		t.Errorf("%s: Type=%s, want notify (tpd sends READY=1 when it listens)", unitFile, got)
	}
	if got := u.one(t, "Service", "ExecReload"); got != "/bin/kill -HUP $MAINPID" {
		t.Errorf("%s: ExecReload=%s, want the SIGHUP tpd reloads on", unitFile, got)
	}
	stop, err := time.ParseDuration(u.one(t, "Service", "TimeoutStopSec"))
	if err != nil {
		t.Fatalf("%s: TimeoutStopSec: %v", unitFile, err)
	}
	if stop <= drainBound {
		t.Errorf("%s: TimeoutStopSec=%s does not exceed the %s drain: systemd would SIGKILL a draining tpd", unitFile, stop, drainBound)
	}

	env := svc["Environment"]
	wantData := "/var/lib/" + u.one(t, "Service", "StateDirectory")
	if !slices.Contains(env, "TP_DATA_DIR="+wantData) {
		t.Errorf("%s: Environment=%v does not set TP_DATA_DIR=%s, the StateDirectory systemd makes writable", unitFile, env, wantData)
	}
	start := strings.Fields(u.one(t, "Service", "ExecStart"))
	if len(start) < 2 || start[0] != "/usr/local/bin/tpd" {
		t.Fatalf("%s: ExecStart=%v, want /usr/local/bin/tpd serve …", unitFile, start)
	}
	if out, err := runTPD(t, env, append(start[1:], "--help")...); err != nil {
		t.Errorf("%s: tpd does not accept ExecStart's arguments %v: %v\n%s", unitFile, start[1:], err, out)
	}
}
