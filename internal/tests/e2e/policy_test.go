package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const dbaPolicy = `package tp.authz

allow if {
	input.action == "dial"
	input.destination.host == "db.internal"
	input.destination.port == 5432
	"dba" in input.identity.groups
}

allowed_internal contains "10.0.0.0/24" if "dba" in input.identity.groups
`

const dbaPolicyTests = `package tp.authz_test

import data.tp.authz

req(groups) := {"action": "dial", "identity": {"device_id": "x@y", "groups": groups},
	"destination": {"host": "db.internal", "port": 5432, "ips": ["10.0.0.5"], "embedded_ipv4": []}}

test_dba_reaches_db if authz.allow with input as req(["dba"])

test_dev_does_not if not authz.allow with input as req(["dev"])
`

// tpd policy test and tpd policy eval work offline on the data dir: tests pass or
// fail with the right exit status, and eval shows decision, reason and rules.
func TestPolicyTooling(t *testing.T) {
	parallel(t)
	dir := filepath.Join(t.TempDir(), "tpdata")
	run(t, nil, binary("tpd"), "init", "--data-dir", dir)
	write := func(name, src string) {
		if err := os.WriteFile(filepath.Join(dir, "policy", name), []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("db.rego", dbaPolicy)
	write("db_test.rego", dbaPolicyTests)
	out := run(t, nil, binary("tpd"), "policy", "test", "--data-dir", dir)
	if !strings.Contains(out, "2 passed, 0 failed") {
		t.Fatalf("policy test:\n%s", out)
	}
	write("wrong_test.rego", "package tp.authz_test\n\nimport data.tp.authz\n\ntest_everyone if authz.allow with input as {\"action\": \"dial\", \"identity\": {\"groups\": []}, \"destination\": {\"host\": \"db.internal\", \"port\": 5432, \"ips\": [], \"embedded_ipv4\": []}}\n")
	out, err := runErr(nil, nil, binary("tpd"), "policy", "test", "--data-dir", dir)
	if err == nil || !strings.Contains(out, "FAIL  data.tp.authz_test.test_everyone") || !strings.Contains(out, "1 of 3 policy tests failed") {
		t.Fatalf("failing policy test: %v\n%s", err, out)
	}
	os.Remove(filepath.Join(dir, "policy", "wrong_test.rego"))

	out = run(t, nil, binary("tpd"), "policy", "eval", "--data-dir", dir, "--user", "alice", "--device", "laptop",
		"--dest", "DB.internal.:5432", "--groups", "dba", "--ip", "10.0.0.5")
	for _, want := range []string{"Decision:   allow", "db.internal:5432", "db.rego:3", "allow", "allowed_internal contains"} {
		if !strings.Contains(out, want) {
			t.Fatalf("eval (allow) lacks %q:\n%s", want, out)
		}
	}
	out = run(t, nil, binary("tpd"), "policy", "eval", "--data-dir", dir, "--user", "alice", "--device", "laptop",
		"--dest", "0x7f.1:5432", "--groups", "dba")
	for _, want := range []string{"Decision:   deny", "127.0.0.1 is an internal address", "deny contains msg", "Addresses:  127.0.0.1"} {
		if !strings.Contains(out, want) {
			t.Fatalf("eval (deny) lacks %q:\n%s", want, out)
		}
	}
	out = run(t, nil, binary("tpd"), "policy", "eval", "--data-dir", dir, "--user", "bob", "--dest", "db.internal:5432", "--ip", "10.0.0.5")
	if !strings.Contains(out, "Decision:   deny") || !strings.Contains(out, "db.internal resolves to an internal address") {
		t.Fatalf("eval (no group):\n%s", out)
	}
}
