package policy_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/policy"
)

const dbaRule = `package tp.authz

allow if {
	input.action == "dial"
	input.destination.host == "db.internal"
	"dba" in input.identity.groups
}

allowed_internal contains "10.0.0.0/24"
`

const dbaTests = `package tp.authz_test

import data.tp.authz

test_dba_reaches_db if {
	authz.allow with input as {"action": "dial", "identity": {"groups": ["dba"]}, "destination": {"host": "db.internal", "ips": ["10.0.0.5"], "embedded_ipv4": []}}
}

test_dev_does_not if {
	not authz.allow with input as {"action": "dial", "identity": {"groups": ["dev"]}, "destination": {"host": "db.internal", "ips": ["10.0.0.5"], "embedded_ipv4": []}}
}
`

const wrongTest = `package tp.authz_test

import data.tp.authz

test_everyone_reaches_db if {
	authz.allow with input as {"action": "dial", "identity": {"groups": []}, "destination": {"host": "db.internal", "ips": [], "embedded_ipv4": []}}
}
`

func TestRunTests(t *testing.T) {
	dir := writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy, "db.rego": dbaRule, "db_test.rego": dbaTests})
	res, err := policy.RunTests(context.Background(), dir, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 2 {
		t.Fatalf("%d results; want 2: %+v", len(res), res)
	}
	for _, r := range res {
		if !r.Pass || !strings.HasPrefix(r.Location, "db_test.rego:") {
			t.Errorf("%+v", r)
		}
	}
	dir = writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy, "db.rego": dbaRule, "db_test.rego": dbaTests, "wrong_test.rego": wrongTest})
	res, err = policy.RunTests(context.Background(), dir, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	failed := 0
	for _, r := range res {
		if !r.Pass {
			failed++
			if r.Name != "data.tp.authz_test.test_everyone_reaches_db" {
				t.Errorf("unexpected failure %+v", r)
			}
		}
	}
	if failed != 1 {
		t.Fatalf("%d failures; want 1: %+v", failed, res)
	}
	// A test file that does not compile is an error, not a pass.
	dir = writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy, "x_test.rego": "package x\n\ntest_x if {"})
	if _, err := policy.RunTests(context.Background(), dir, 10*time.Second); err == nil {
		t.Fatal("a broken test file was accepted")
	}
}

func TestExplain(t *testing.T) {
	e := load(t, writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy, "db.rego": dbaRule}))
	var full bytes.Buffer
	res, matches, err := e.Explain(context.Background(), ssrfInput([]string{"dba"}, "db.internal", "10.0.0.5"), &full)
	if err != nil || !res.Allow {
		t.Fatalf("%+v, %v", res, err)
	}
	if !hasMatch(matches, "allow", "db.rego:3") || !hasMatch(matches, "internal_allowed(ip)", "tp.rego:") {
		t.Errorf("matches %+v; want db.rego's allow and tp.rego's internal_allowed", matches)
	}
	if full.Len() == 0 {
		t.Error("no full trace")
	}
	res, matches, err = e.Explain(context.Background(), ssrfInput([]string{"dba"}, "db.internal", "127.0.0.1"), nil)
	if err != nil || res.Allow || len(res.Deny) != 1 {
		t.Fatalf("%+v, %v", res, err)
	}
	if !hasMatch(matches, "deny contains msg", "tp.rego:") {
		t.Errorf("matches %+v; want tp.rego's deny", matches)
	}
}

func hasMatch(ms []policy.Match, rule, loc string) bool {
	for _, m := range ms {
		if m.Rule == rule && strings.HasPrefix(m.Location, loc) {
			return true
		}
	}
	return false
}

// A reload whose tests fail is refused and the previous policy keeps deciding;
// once the tests pass, it goes live.
func TestReloadRefusedWhenTestsFail(t *testing.T) {
	dir := writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy, "db.rego": dbaRule, "db_test.rego": dbaTests})
	e := load(t, dir)
	before := e.Revision()
	writeFile(t, dir, "db.rego", strings.Replace(dbaRule, `"dba" in`, `"dev" in`, 1))
	err := e.Reload(context.Background())
	if err == nil || !strings.Contains(err.Error(), "test_dba_reaches_db") || !strings.Contains(err.Error(), "fails 2 of its 2 tests") {
		t.Fatalf("reload with failing tests: %v", err)
	}
	if e.Revision() != before {
		t.Fatal("a policy with failing tests went live")
	}
	writeFile(t, dir, "db_test.rego", strings.NewReplacer(`"dba"]`, `"dev"]`, `"dev"]}, "destination"`, `"dba"]}, "destination"`).Replace(dbaTests))
	if err := e.Reload(context.Background()); err != nil {
		t.Fatalf("reload with fixed tests: %v", err)
	}
	if e.Revision() == before {
		t.Fatal("the fixed policy did not go live")
	}
	// At start, too.
	writeFile(t, dir, "wrong_test.rego", wrongTest)
	if _, err := policy.Load(context.Background(), dir); err == nil {
		t.Fatal("Load accepted a policy whose tests fail")
	}
}

func writeFile(t *testing.T, dir, name, src string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
}

// Bad input: only db_test.rego changes, to a test the unchanged policy fails.
// Reload once compared the policy files alone and said nothing.
func TestReloadNoticesChangedTestsAlone(t *testing.T) {
	dir := writePolicy(t, map[string]string{"tp.rego": policy.DefaultPolicy, "db.rego": dbaRule, "db_test.rego": dbaTests})
	e := load(t, dir)
	before := e.Revision()
	broken := strings.NewReplacer(`"dba"]`, `"dev"]`, `"dev"]}, "destination"`, `"dba"]}, "destination"`).Replace(dbaTests)
	writeFile(t, dir, "db_test.rego", broken)
	err := e.Reload(context.Background())
	if err == nil || !strings.Contains(err.Error(), "fails 2 of its 2 tests") {
		t.Fatalf("reload after only the tests changed, to failing ones: %v", err)
	}
	if e.Revision() != before {
		t.Fatal("the policy's revision changed although no policy file did")
	}
	writeFile(t, dir, "db_test.rego", dbaTests)
	if err := e.Reload(context.Background()); err != nil {
		t.Fatalf("reload with the tests restored: %v", err)
	}
	// A new test file alone is checked too.
	writeFile(t, dir, "wrong_test.rego", wrongTest)
	if err := e.Reload(context.Background()); err == nil {
		t.Fatal("reload accepted a new test file that fails")
	}
}
