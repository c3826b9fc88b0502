package policy_test

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/policy"
)

// Every decision — allowed, denied by the policy, denied by the deny list, failed —
// is one JSON line with identity, action, destination, resolved IPs, decision,
// reason and policy revision, appended to a 0600 file.
func TestDecisionLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "decisions.jsonl")
	dl, err := policy.OpenDecisionLog(path)
	if err != nil {
		t.Fatal(err)
	}
	e := loadPolicy(t, dbaPolicy)
	deny := &authz.DenyList{}
	deny.Add(authz.DenyUser, "mallory")
	p := &policy.Authorizer{Directory: &mapDirectory{}, Evaluator: e, DenyList: deny, Decisions: dl}
	ctx := context.Background()
	for _, req := range []authz.Request{
		dial(identity("alice", "laptop", "dba"), "db.internal", 5432, "10.0.0.5"),
		dial(identity("bob", "pc", "dev"), "db.internal", 5432, "10.0.0.5", "64:ff9b::a00:6"),
		dial(identity("mallory", "pc", "dba"), "db.internal", 5432, "10.0.0.5"),
	} {
		if _, err := p.Authorize(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	broken := &policy.Authorizer{Directory: &mapDirectory{}, Evaluator: loadPolicy(t, "package tp.authz\n\nallow := 1\n"), Decisions: dl}
	if _, err := broken.Authorize(ctx, dial(identity("alice", "laptop"), "x.example", 443, "93.184.215.14")); err == nil {
		t.Fatal("a non-boolean allow did not fail")
	}
	if err := dl.Close(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("decision log mode %v; want 0600", fi.Mode().Perm())
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var lines []policy.Decision
	var raw []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		raw = append(raw, sc.Text())
		var d policy.Decision
		if err := json.Unmarshal(sc.Bytes(), &d); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		lines = append(lines, d)
	}
	if len(lines) != 4 {
		t.Fatalf("%d lines; want 4:\n%s", len(lines), strings.Join(raw, "\n"))
	}
	want := []struct{ decision, reason, revision, err string }{
		{"allow", "", e.Revision(), ""},
		{"deny", "postgres is for the dba group", e.Revision(), ""},
		{"deny", "access for user mallory has been revoked", "", ""},
		{"deny", policy.ReasonFailed, "", "want a boolean"},
	}
	for i, w := range want {
		d := lines[i]
		if d.Decision != w.decision || !strings.Contains(d.Reason, w.reason) || d.Revision != w.revision && w.revision != "" ||
			w.err == "" && d.Error != "" || !strings.Contains(d.Error, w.err) || d.Time.IsZero() || d.Action != "dial" {
			t.Errorf("line %d: %s; want %+v", i, raw[i], w)
		}
	}
	if !strings.Contains(raw[1], `"ips":["10.0.0.5","64:ff9b::a00:6"]`) || !strings.Contains(raw[1], `"embedded_ipv4":["10.0.0.6"]`) ||
		!strings.Contains(raw[1], `"device_id":"bob@pc"`) || !strings.Contains(raw[1], `"groups":["dev"]`) {
		t.Errorf("line 1 lacks identity or addresses: %s", raw[1])
	}
	// Appending: a second open adds to the file.
	dl2, err := policy.OpenDecisionLog(path)
	if err != nil {
		t.Fatal(err)
	}
	p.Decisions = dl2
	if _, err := p.Authorize(ctx, dial(identity("alice", "laptop", "dba"), "db.internal", 5432, "10.0.0.5")); err != nil {
		t.Fatal(err)
	}
	dl2.Close()
	b, _ := os.ReadFile(path)
	if n := strings.Count(string(b), "\n"); n != 5 {
		t.Errorf("%d lines after reopening; want 5", n)
	}
}
