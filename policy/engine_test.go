package policy_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/policy"
)

// input builds an input document shaped like the one package authz builds.
func input(user, device string, groups []string, action, host string, port int, ips ...string) map[string]any {
	g := make([]any, len(groups))
	for i, s := range groups {
		g[i] = s
	}
	ipv := make([]any, len(ips))
	for i, s := range ips {
		ipv[i] = s
	}
	return map[string]any{
		"action": action,
		"identity": map[string]any{
			"user":      user,
			"device":    device,
			"device_id": user + "@" + device,
			"groups":    g,
			"serial":    "0a1b2c",
			"expiry":    "2030-01-01T00:00:00Z",
		},
		"destination": map[string]any{
			"host":    host,
			"port":    port,
			"network": "tcp",
			"ips":     ipv,
		},
		"source": map[string]any{"address": "192.0.2.1:40000", "transport": "tls"},
		"time":   time.Now().UTC().Format(time.RFC3339Nano),
	}
}

// writePolicy writes files (name → Rego source) into a fresh directory.
func writePolicy(t testing.TB, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, src := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// load loads dir with a generous timeout, so that a busy machine running -race does
// not turn slowness into failures; tests about timeouts pass their own.
func load(t testing.TB, dir string, opts ...policy.Option) *policy.Engine {
	t.Helper()
	opts = append([]policy.Option{policy.WithTimeout(10 * time.Second)}, opts...)
	e, err := policy.Load(context.Background(), dir, opts...)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return e
}

const groupPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "dial"
	input.destination.host == "db.internal"
	input.destination.port == 5432
	"dba" in input.identity.groups
}
`

func TestDefaultPolicyDeniesWithReason(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "policy")
	if err := policy.WriteDefault(dir); err != nil {
		t.Fatal(err)
	}
	e := load(t, dir)
	ctx := context.Background()

	res, err := e.Eval(ctx, input("alice", "laptop", []string{"admin"}, "dial", "db.internal", 5432, "192.0.2.5"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Allow {
		t.Fatal("default policy allowed a request")
	}
	const want = "no policy rule allows alice@laptop to dial db.internal port 5432"
	if res.Reason != want {
		t.Errorf("reason = %q, want %q", res.Reason, want)
	}
	if res.Revision == "" || res.Revision != e.Revision() {
		t.Errorf("result revision %q, engine revision %q", res.Revision, e.Revision())
	}

	// An input without the fields the reason names still gets a reason.
	res, err = e.Eval(ctx, map[string]any{"action": "dial"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Allow || res.Reason != "no policy rule allows this request" {
		t.Errorf("empty input: got %+v", res)
	}
}

// TestDefaultPolicyExamples uncomments every example in the default policy and checks
// that the result compiles and does what the comments say.
func TestDefaultPolicyExamples(t *testing.T) {
	code := regexp.MustCompile(`(?m)^# ((?:allow if|allowed_internal contains|deny_reason contains|    |\}).*)$`)
	src := code.ReplaceAllString(policy.DefaultPolicy, "$1")
	if src == policy.DefaultPolicy {
		t.Fatal("found no commented examples")
	}
	e := load(t, writePolicy(t, map[string]string{"tp.rego": src}))
	tests := []struct {
		name   string
		in     map[string]any
		allow  bool
		reason string
	}{
		{"dba to postgres", input("bob", "pc", []string{"dba"}, "dial", "db.internal", 5432, "10.0.0.5"), true, ""},
		{"non-dba to postgres", input("bob", "pc", []string{"dev"}, "dial", "db.internal", 5432, "10.0.0.5"), false, "no policy rule allows bob@pc to dial db.internal port 5432"},
		{"dba to other port", input("bob", "pc", []string{"dba"}, "dial", "db.internal", 22, "10.0.0.5"), false, ""},
		{"alice ssh", input("alice", "laptop", nil, "dial", "build.internal", 22, "10.0.0.6"), true, ""},
		{"bob ssh", input("bob", "pc", nil, "dial", "build.internal", 22, "10.0.0.6"), false, ""},
		{"ops dns", input("carol", "pc", []string{"ops"}, "dial_udp", "dns.internal", 53, "10.0.0.53"), true, ""},
		{"public https", input("bob", "pc", nil, "dial", "example.org", 443, "93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"), true, ""},
		{"https to metadata", input("bob", "pc", nil, "dial", "metadata.example", 443, "169.254.169.254"), false, ""},
		{"https to loopback v6", input("bob", "pc", nil, "dial", "x.example", 443, "93.184.215.14", "::1"), false, ""},
		{"alice listen", input("alice", "laptop", nil, "listen", "laptop-ssh", 0), true, ""},
		{"prod ssh reason", input("bob", "pc", nil, "dial", "web1.prod.internal", 22, "10.0.0.9"), false, "ssh to production needs the ops group; ask #infra"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := e.Eval(context.Background(), tt.in)
			if err != nil {
				t.Fatal(err)
			}
			if res.Allow != tt.allow {
				t.Errorf("allow = %v, want %v (reason %q)", res.Allow, tt.allow, res.Reason)
			}
			if tt.allow && res.Reason != "" {
				t.Errorf("allowed with reason %q", res.Reason)
			}
			if tt.reason != "" && res.Reason != tt.reason {
				t.Errorf("reason = %q, want %q", res.Reason, tt.reason)
			}
		})
	}
}

func TestGroupPolicyAllowsOnlyThatGroup(t *testing.T) {
	e := load(t, writePolicy(t, map[string]string{"db.rego": groupPolicy}))
	tests := []struct {
		groups []string
		allow  bool
	}{
		{[]string{"dba"}, true},
		{[]string{"dev", "dba"}, true},
		{[]string{"dev"}, false},
		{[]string{"DBA"}, false},
		{nil, false},
	}
	for _, tt := range tests {
		res, err := e.Eval(context.Background(), input("bob", "pc", tt.groups, "dial", "db.internal", 5432, "10.0.0.5"))
		if err != nil {
			t.Fatal(err)
		}
		if res.Allow != tt.allow {
			t.Errorf("groups %v: allow = %v, want %v", tt.groups, res.Allow, tt.allow)
		}
		if !res.Allow && res.Reason != "" {
			t.Errorf("groups %v: reason %q from a policy that defines none", tt.groups, res.Reason)
		}
	}
}

func TestEvalFailsClosed(t *testing.T) {
	tests := []struct {
		name    string
		src     string
		wantErr string
	}{
		{"undefined allow", "package tp.authz\n\nallow if input.action == \"listen\"\n", "allow undefined"},
		{"empty package", "package tp.authz\n\nimport rego.v1\n", "allow undefined"},
		{"string allow", "package tp.authz\n\nallow := \"yes\"\n", `sets allow to the string "yes", want a boolean`},
		{"number allow", "package tp.authz\n\nallow := 1\n", "want a boolean"},
		{"set allow", "package tp.authz\n\nallow contains 1\n", "want a boolean"},
		{"non-string reason", "package tp.authz\n\ndefault allow := false\n\nreason := 42\n", "want a string"},
		{"conflicting rules", "package tp.authz\n\nallow := true if input.action == \"dial\"\n\nallow := false if input.destination.port == 5432\n", "conflicting values"},
		{"builtin error", "package tp.authz\n\ndefault allow := false\n\nallow if net.cidr_contains(\"not a cidr\", input.destination.ips[0])\n", "net.cidr_contains"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := load(t, writePolicy(t, map[string]string{"p.rego": tt.src}))
			res, err := e.Eval(context.Background(), input("bob", "pc", nil, "dial", "db.internal", 5432, "10.0.0.5"))
			if err == nil {
				t.Fatalf("no error; result %+v", res)
			}
			if res.Allow {
				t.Error("error came with Allow = true")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string
		wantErr []string
	}{
		{"parse error", map[string]string{"ok.rego": groupPolicy, "broken.rego": "package tp.authz\n\nallow if {\n"},
			[]string{"broken.rego:", "rego_parse_error"}},
		{"compile error", map[string]string{"unsafe.rego": "package tp.authz\n\nallow if { x }\n"},
			[]string{"unsafe.rego:3", "var x is unsafe"}},
		{"v0 syntax", map[string]string{"old.rego": "package tp.authz\n\nallow { true }\n"},
			[]string{"old.rego:", "rego_parse_error"}},
		{"wrong package", map[string]string{"other.rego": "package other\n\nallow := true\n"},
			[]string{"other.rego", "declares package other", "must declare package tp.authz"}},
		{"empty file", map[string]string{"empty.rego": ""},
			[]string{"empty.rego", "empty module"}},
		{"network builtin", map[string]string{"net.rego": "package tp.authz\n\nallow if http.send({\"method\": \"GET\", \"url\": \"http://127.0.0.1:1/\"}).status_code == 200\n"},
			[]string{"net.rego:3", "undefined function http.send"}},
		{"dns builtin", map[string]string{"dns.rego": "package tp.authz\n\nallow if count(net.lookup_ip_addr(\"example.org\")) > 0\n"},
			[]string{"dns.rego:3", "undefined function net.lookup_ip_addr"}},
		{"no files", map[string]string{"README": "hello"},
			[]string{"holds no .rego files"}},
		{"only tests", map[string]string{"p_test.rego": "package tp.authz\n"},
			[]string{"holds no .rego files"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := policy.Load(context.Background(), writePolicy(t, tt.files))
			if err == nil {
				t.Fatalf("Load succeeded, revision %s", e.Revision())
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	if _, err := policy.Load(context.Background(), filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing directory: err = %v, want os.ErrNotExist", err)
	}
}

func TestLoadSkipsTestFilesAndOthers(t *testing.T) {
	dir := writePolicy(t, map[string]string{
		"db.rego":         groupPolicy,
		"db_test.rego":    "package tp.authz_test\n\ntest_ok if true\n", // run, but not part of the policy
		"notes.txt":       "not rego",
		"backup.rego.bak": "package other\n",
	})
	if err := os.Mkdir(filepath.Join(dir, "sub.rego"), 0o700); err != nil {
		t.Fatal(err)
	}
	e := load(t, dir)
	if got := e.Files(); len(got) != 1 || got[0] != "db.rego" {
		t.Errorf("Files() = %v, want [db.rego]", got)
	}
	// A test file that does not parse fails the tests, so the policy is refused.
	if err := os.WriteFile(filepath.Join(dir, "db_test.rego"), []byte("package tp.authz\n\ntest_broken if {\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := policy.Load(context.Background(), dir); err == nil || !strings.Contains(err.Error(), "db_test.rego") {
		t.Errorf("broken test file: %v", err)
	}
}

func TestRevision(t *testing.T) {
	a := load(t, writePolicy(t, map[string]string{"a.rego": groupPolicy, "b.rego": "package tp.authz\n"}))
	b := load(t, writePolicy(t, map[string]string{"b.rego": "package tp.authz\n", "a.rego": groupPolicy}))
	if a.Revision() != b.Revision() {
		t.Errorf("same files, different revisions %s and %s", a.Revision(), b.Revision())
	}
	if len(a.Revision()) != 12 {
		t.Errorf("revision %q is not 12 hex digits", a.Revision())
	}
	c := load(t, writePolicy(t, map[string]string{"c.rego": groupPolicy, "b.rego": "package tp.authz\n"}))
	if a.Revision() == c.Revision() {
		t.Error("renaming a file did not change the revision")
	}
	d := load(t, writePolicy(t, map[string]string{"a.rego": groupPolicy + "\n", "b.rego": "package tp.authz\n"}))
	if a.Revision() == d.Revision() {
		t.Error("changing a file did not change the revision")
	}
}

func TestReload(t *testing.T) {
	dir := writePolicy(t, map[string]string{"p.rego": groupPolicy})
	e := load(t, dir)
	ctx := context.Background()
	dev := input("bob", "pc", []string{"dev"}, "dial", "db.internal", 5432, "10.0.0.5")
	rev1 := e.Revision()

	// Unchanged directory: same revision, no error.
	if err := e.Reload(ctx); err != nil || e.Revision() != rev1 {
		t.Fatalf("reload of unchanged dir: err %v, revision %s → %s", err, rev1, e.Revision())
	}

	// A broken file: the error names it, and the old policy keeps answering.
	broken := filepath.Join(dir, "zz.rego")
	if err := os.WriteFile(broken, []byte("package tp.authz\n\nallow if { y }\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := e.Reload(ctx)
	if err == nil || !strings.Contains(err.Error(), "zz.rego:3") || !strings.Contains(err.Error(), "var y is unsafe") {
		t.Fatalf("reload with broken file: err = %v", err)
	}
	if e.Revision() != rev1 {
		t.Fatalf("revision changed to %s after a failed reload", e.Revision())
	}
	res, err := e.Eval(ctx, dev)
	if err != nil || res.Allow || res.Revision != rev1 {
		t.Fatalf("after failed reload: %+v, %v", res, err)
	}

	// Fix it: the new policy answers.
	if err := os.WriteFile(broken, []byte("package tp.authz\n\nallow if \"dev\" in input.identity.groups\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if e.Revision() == rev1 {
		t.Fatal("revision did not change")
	}
	res, err = e.Eval(ctx, dev)
	if err != nil || !res.Allow || res.Revision != e.Revision() {
		t.Fatalf("after reload: %+v, %v", res, err)
	}

	// Removing every file fails and keeps the last good policy.
	for _, n := range []string{"p.rego", "zz.rego"} {
		if err := os.Remove(filepath.Join(dir, n)); err != nil {
			t.Fatal(err)
		}
	}
	rev2 := e.Revision()
	if err := e.Reload(ctx); err == nil {
		t.Fatal("reload of an empty directory succeeded")
	}
	if e.Revision() != rev2 {
		t.Fatal("empty directory replaced the policy")
	}
}

// slowPolicy iterates 25 million times without allocating a result.
const slowPolicy = `package tp.authz

default allow := false

allow if {
	count([1 | some i in numbers.range(1, 5000); some j in numbers.range(1, 5000); i * j < 0]) > 0
}
`

func TestEvalTimeout(t *testing.T) {
	const timeout = 20 * time.Millisecond
	e := load(t, writePolicy(t, map[string]string{"slow.rego": slowPolicy}), policy.WithTimeout(timeout))
	res, err := e.Eval(context.Background(), input("bob", "pc", nil, "dial", "x", 1))
	if err == nil {
		t.Fatalf("slow policy finished: %+v", res)
	}
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "did not finish within 20ms") {
		t.Errorf("err = %v, want a deadline error naming the timeout", err)
	}
	if res.Allow {
		t.Error("timeout came with Allow = true")
	}

	// The caller's own cancellation stops evaluation as well.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	e = load(t, writePolicy(t, map[string]string{"slow.rego": slowPolicy}), policy.WithTimeout(time.Minute))
	if _, err := e.Eval(ctx, input("bob", "pc", nil, "dial", "x", 1)); !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "abandoned") {
		t.Errorf("cancelled context: err = %v, want context.Canceled", err)
	}
}

// TestConcurrentEvalDuringReload flips the policy between two revisions while
// evaluations run, and checks that every answer matches the revision it reports.
func TestConcurrentEvalDuringReload(t *testing.T) {
	allowSrc := "package tp.authz\n\nallow := true\n"
	denySrc := "package tp.authz\n\nallow := false\n\nreason := \"closed\"\n"
	dir := writePolicy(t, map[string]string{"p.rego": allowSrc})
	e := load(t, dir)
	ctx := context.Background()
	revAllow := e.Revision()
	path := filepath.Join(dir, "p.rego")

	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	var evals atomic.Int64
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := input("bob", "pc", nil, "dial", "x", 1)
			for !stop.Load() {
				res, err := e.Eval(ctx, in)
				if err != nil {
					errs <- err
					return
				}
				evals.Add(1)
				if res.Allow != (res.Revision == revAllow) {
					errs <- fmt.Errorf("revision %s answered allow=%v", res.Revision, res.Allow)
					return
				}
			}
		}()
	}
	for i := range 40 {
		src := denySrc
		if i%2 == 1 {
			src = allowSrc
		}
		if i%10 == 5 {
			src = "package tp.authz\n\nallow if {\n" // a broken write in between
		}
		if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
		err := e.Reload(ctx)
		if (err != nil) != (i%10 == 5) {
			t.Fatalf("reload %d: %v", i, err)
		}
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if evals.Load() == 0 {
		t.Error("no evaluation ran")
	}
}

func TestWriteDefault(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data", "policy")
	if err := policy.WriteDefault(dir); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, want 0700", st.Mode().Perm())
	}
	path := filepath.Join(dir, policy.DefaultFile)
	st, err = os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("file mode %v, want 0600", st.Mode().Perm())
	}

	// A second call, or any operator policy, is left alone.
	if err := os.WriteFile(path, []byte("package tp.authz\n\nallow := true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := policy.WriteDefault(dir); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "package tp.authz\n\nallow := true\n" {
		t.Error("WriteDefault overwrote an existing policy")
	}

	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, "mine.rego"), []byte(groupPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := policy.WriteDefault(other); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(other, policy.DefaultFile)); !errors.Is(err, os.ErrNotExist) {
		t.Error("WriteDefault added tp.rego next to an existing policy")
	}
}

func BenchmarkEval(b *testing.B) {
	ctx := context.Background()
	for _, bc := range []struct {
		name string
		src  string
	}{
		{"default", policy.DefaultPolicy},
		{"group", groupPolicy},
	} {
		b.Run(bc.name, func(b *testing.B) {
			// The evaluation, not the decision cache (BenchmarkAuthorize has both).
			e := load(b, writePolicy(b, map[string]string{"p.rego": bc.src}), policy.WithoutCache())
			in := input("bob", "pc", []string{"dev", "dba"}, "dial", "db.internal", 5432, "10.0.0.5")
			b.ReportAllocs()
			for b.Loop() {
				if _, err := e.Eval(ctx, in); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
