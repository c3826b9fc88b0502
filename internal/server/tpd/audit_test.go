package tpd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// auditLines reads the audit file and parses every line as a JSON object; a
// line that does not parse fails the test.
func auditLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if !utf8.Valid(sc.Bytes()) {
			t.Fatalf("audit line is not valid UTF-8: %q", sc.Bytes())
		}
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("audit line %q is not a JSON object: %v", sc.Bytes(), err)
		}
		out = append(out, m)
	}
	return out
}

// waitAudit polls the audit file until a line matches, and returns it.
func waitAudit(t *testing.T, path, what string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	var last []map[string]any
	poll(t, what, func() bool {
		last = auditLines(t, path)
		for _, l := range last {
			if match(l) {
				return true
			}
		}
		return false
	})
	for _, l := range last {
		if match(l) {
			return l
		}
	}
	return nil
}

// The bad input: a destination and a reason holding newlines, quotes, a whole
// fake audit line and invalid UTF-8 (the writer, not the hello parser, is what
// must hold here: any field a client controls ends up in the line). Each must
// stay inside its string; the file gets exactly one line per call, created 0600,
// appended to, and reopened by name after rotation.
func TestAuditLogEscapesHostileFields(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := OpenAuditLog(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fake := `{"time":"2026-01-01T00:00:00Z","kind":"admin","act":"revoke","subject":"user alice","result":"ok"}`
	hostile := "evil\n" + fake + "\r\n\"quoted\" \\ \u2028 \x00 \xff\xfe end"
	start := time.Now().Add(-1500 * time.Millisecond)
	if err := l.Session(proxy.SessionRecord{Start: start, End: start.Add(1500 * time.Millisecond), Identity: "mallory@pc",
		Transport: "tls", Action: "dial", Destination: hostile, Decision: "deny", EndCode: "policy_denied", EndReason: hostile}); err != nil {
		t.Fatal(err)
	}
	if err := l.Admin(admin.Act{Act: "enroll_token", Subject: hostile, Via: "admin socket", Result: "refused", Reason: hostile}); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("audit log mode %v; want 0600", st.Mode().Perm())
	}
	lines := auditLines(t, path)
	if len(lines) != 2 {
		t.Fatalf("%d lines; want 2 (one per record): a hostile field split a line", len(lines))
	}
	// encoding/json turns each invalid byte into U+FFFD; everything else comes back as it went in.
	want := strings.ReplaceAll(hostile, "\xff\xfe", "\uFFFD\uFFFD")
	s, a := lines[0], lines[1]
	if s["kind"] != "session" || s["destination"] != want || s["end_reason"] != want || s["identity"] != "mallory@pc" {
		t.Fatalf("session line does not carry the hostile destination intact: %v", s)
	}
	if d, _ := s["duration_seconds"].(float64); d != 1.5 {
		t.Fatalf("duration_seconds %v; want 1.5", s["duration_seconds"])
	}
	if a["kind"] != "admin" || a["act"] != "enroll_token" || a["subject"] != want || a["reason"] != want {
		t.Fatalf("admin line does not carry the hostile subject intact: %v", a)
	}

	// Rotation: the file is renamed away, Reopen creates a new one by the name;
	// the old file keeps its lines, nothing is lost or truncated.
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := l.Reopen(); err != nil {
		t.Fatal(err)
	}
	if err := l.Admin(admin.Act{Act: "config_reload", Via: "SIGHUP", Result: "ok"}); err != nil {
		t.Fatal(err)
	}
	if n := len(auditLines(t, path+".1")); n != 2 {
		t.Fatalf("rotated file has %d lines; want 2", n)
	}
	if got := auditLines(t, path); len(got) != 1 || got[0]["act"] != "config_reload" {
		t.Fatalf("reopened file: %v; want the one line written after Reopen", got)
	}
	if l2, err := OpenAuditLog(path); err != nil {
		t.Fatal(err)
	} else {
		_ = l2.Admin(admin.Act{Act: "config_reload", Via: "SIGHUP", Result: "ok"})
		l2.Close()
	}
	if n := len(auditLines(t, path)); n != 2 {
		t.Fatalf("after a second open the file has %d lines; want 2 (appended, not truncated)", n)
	}
}

// A real tpd with audit-log set: an allowed session, a denied one whose host is
// the bad input (quotes and a fake JSON object: printable ASCII, so the hello
// parser lets it through to the policy and the log), an enrollment, a
// revocation and a policy reload each leave exactly their line, with the
// fields the README promises.
func TestAuditTrailOfSessionsAndAdminActs(t *testing.T) {
	t.Parallel()
	cfg := newDataDir(t, map[string]string{"tp.rego": allowAlice})
	cfg.AuditLog = filepath.Join(cfg.DataDir, "audit.jsonl")
	// No name resolves: nothing leaves loopback, and the hostile name is denied
	// before its lookup matters.
	r := runDaemon(t, cfg, WithResolver(resolverFunc(func(host string) ([]netip.Addr, error) {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	})))
	echo := testnet.Echo(t)
	alice, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	mallory, _, _ := enrollClient(t, r.d, r.url, "mallory", "pc")
	rev := r.d.Policy().Revision()

	if err := dialEcho(t, alice, echo); err != nil {
		t.Fatal(err)
	}
	ok := waitAudit(t, cfg.AuditLog, "alice's session line", func(l map[string]any) bool {
		return l["kind"] == "session" && l["identity"] == "alice@laptop"
	})
	for k, v := range map[string]any{"transport": "tls", "action": "dial", "destination": echo, "dialed": echo, "decision": "allow",
		"policy_revision": rev, "bytes_up": 1.0, "bytes_down": 1.0, "end_code": "closed", "user": "alice"} {
		if ok[k] != v {
			t.Errorf("allowed session: %s = %v; want %v (line %v)", k, ok[k], v, ok)
		}
	}
	if s, _ := ok["serial"].(string); s == "" {
		t.Errorf("allowed session has no certificate serial: %v", ok)
	}

	_, sh, err := rawRequest(t, mallory, clients.TransportTLS, wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: "127.0.0.1", Port: 22})
	if err != nil || sh.Code != wire.CodePolicyDenied {
		t.Fatalf("mallory's dial: %+v, %v; want policy_denied", sh, err)
	}
	denied := waitAudit(t, cfg.AuditLog, "mallory's denied session", func(l map[string]any) bool {
		return l["kind"] == "session" && l["identity"] == "mallory@pc"
	})
	for k, v := range map[string]any{"destination": "127.0.0.1:22", "decision": "deny", "policy_revision": rev,
		"end_code": wire.CodePolicyDenied, "ended_by": "server", "action": "dial", "end_reason": "policy_denied: " + sh.Reason} {
		if denied[k] != v {
			t.Errorf("denied session: %s = %v; want %v (line %v)", k, denied[k], v, denied)
		}
	}

	// The hostile host: quotes and a fake admin line, printable ASCII without
	// spaces, so it passes the hello's first check and is refused as no host
	// name; the refusal's reason, which quotes it, goes into the line.
	hostile := `evil"}{"kind":"admin","act":"revoke","subject":"user:alice","result":"ok"}{"x":"`
	_, sh, err = rawRequest(t, mallory, clients.TransportTLS, wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: hostile, Port: 22})
	if err != nil || sh.Code != wire.CodeBadRequest || !strings.Contains(sh.Reason, strconv.Quote(hostile)) {
		t.Fatalf("mallory's dial of the hostile host: %+v, %v; want bad_request quoting the host", sh, err)
	}
	waitAudit(t, cfg.AuditLog, "the hostile host's refusal", func(l map[string]any) bool {
		return l["kind"] == "session" && l["identity"] == "mallory@pc" && l["end_code"] == wire.CodeBadRequest &&
			l["end_reason"] == "bad_request: "+sh.Reason && l["ended_by"] == "server"
	})

	ac := admin.NewClient(cfg.AdminSocket())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := ac.Revoke(ctx, admin.RevokeRequest{Kind: "device", Value: "mallory@pc"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.Revoke(ctx, admin.RevokeRequest{Kind: "device", Value: "nobody@nowhere"}); err == nil {
		t.Fatal("revoking an unknown device succeeded")
	}
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(allowAlice+"\n# changed\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.d.ReloadPolicy(ctx); err != nil {
		t.Fatal(err)
	}
	newRev := r.d.Policy().Revision()
	waitAudit(t, cfg.AuditLog, "the policy reload", func(l map[string]any) bool {
		return l["act"] == "policy_reload" && l["result"] == "ok" && l["policy_revision"] == newRev
	})
	// A broken policy is refused, and the refusal is recorded with the revision that stays.
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte("package tp.authz\nallow if {"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.d.ReloadPolicy(ctx); err == nil {
		t.Fatal("a broken policy was accepted")
	}
	waitAudit(t, cfg.AuditLog, "the refused policy reload", func(l map[string]any) bool {
		return l["act"] == "policy_reload" && l["result"] == "refused" && l["policy_revision"] == newRev && l["reason"] != ""
	})
	if _, err := ac.Enroll(ctx, admin.EnrollRequest{User: "carol", Device: "tablet", Groups: []string{"ops"}}); err != nil {
		t.Fatal(err)
	}
	waitAudit(t, cfg.AuditLog, "carol's enrollment token", func(l map[string]any) bool {
		g, _ := l["groups"].([]any)
		return l["act"] == "enroll_token" && l["subject"] == "carol@tablet" && l["result"] == "ok" && len(g) == 1 && g[0] == "ops"
	})
	if _, err := ac.Enroll(ctx, admin.EnrollRequest{User: "carol", Device: "ci", Scope: "expose:ci"}); err != nil {
		t.Fatal(err)
	}
	waitAudit(t, cfg.AuditLog, "carol's scoped enrollment token", func(l map[string]any) bool {
		return l["act"] == "enroll_token" && l["subject"] == "carol@ci" && l["result"] == "ok" && l["scope"] == "expose:ci"
	})
	// Bad input: a scope TP does not know issues no token.
	if _, err := ac.Enroll(ctx, admin.EnrollRequest{User: "carol", Device: "ci2", Scope: "admin:all"}); err == nil || !strings.Contains(err.Error(), "want expose:LABEL") {
		t.Fatalf("an enrollment with scope admin:all: %v; want it refused, naming the scopes there are", err)
	}

	lines := auditLines(t, cfg.AuditLog)
	count := map[string]int{}
	for _, l := range lines {
		if l["kind"] == "admin" {
			count[fmt.Sprint(l["act"], " ", l["subject"], " ", l["result"])]++
		}
	}
	for what, n := range map[string]int{
		"enrolled alice@laptop ok":             1,
		"enrolled mallory@pc ok":               1,
		"revoke device mallory@pc ok":          1,
		"revoke device nobody@nowhere refused": 1,
		"revoke user:alice ok":                 0, // the forged line must not exist
	} {
		if count[what] != n {
			t.Errorf("%d admin lines %q; want %d (all: %v)", count[what], what, n, count)
		}
	}
}

// tpd status over the admin socket, against a real tpd: a live tunnel, an agent
// with a public port, a public client and a denial show, in the JSON and in the
// table; the public client's session leaves its audit line.
func TestStatusShowsLiveView(t *testing.T) {
	t.Parallel()
	port := testnet.FreePort(t, "tcp")
	policy := fmt.Sprintf(publicPolicy, port) + `
allow if {
	input.action == "dial"
	input.identity.user == "alice"
}
`
	var cfg config.Server
	d, url := startDaemonCfg(t, policy, func(c *config.Server) {
		c.PublicPorts = strconv.Itoa(port)
		c.AuditLog = filepath.Join(c.DataDir, "audit.jsonl")
		cfg = *c
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	mallory, _, _ := enrollClient(t, d, url, "mallory", "pc")
	echo := testnet.Echo(t)

	tunnel := openSession(t, alice, echo) // stays open
	stopAgent, err := runAgent(t, alice, clients.TransportQUIC, []clients.Exposed{{Name: "game", Local: testnet.Upper(t), PublicPort: port}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := roundTrip(c, []byte("hi")); err != nil || string(got) != "HI" {
		t.Fatalf("public client: %q, %v", got, err)
	}
	if err := dialEcho(t, mallory, echo); err == nil {
		t.Fatal("mallory's dial was allowed")
	}

	ac := admin.NewClient(cfg.AdminSocket())
	var st admin.Status
	poll(t, "status with the tunnel, the agent, the port and the denial", func() bool {
		st, err = ac.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return len(st.Denials) == 1 && len(st.Agents) == 1
	})
	var sawTunnel, sawListen bool
	for _, s := range st.Sessions {
		sawTunnel = sawTunnel || s.Identity == "alice@laptop" && s.Action == "dial" && s.Destination == echo
		sawListen = sawListen || s.Identity == "alice@laptop" && s.Action == "listen" && s.Transport == "quic"
	}
	if !sawTunnel || !sawListen {
		t.Errorf("sessions %+v; want alice's tunnel to %s and her agent's listen", st.Sessions, echo)
	}
	if a := st.Agents[0]; a.Identity != "alice@laptop" || a.Transport != "quic" || len(a.Names) != 1 || !strings.HasPrefix(a.Names[0], "game.") ||
		len(a.Public) != 1 || a.Public[0] != fmt.Sprintf("public TCP port %d", port) {
		t.Errorf("agent %+v", a)
	}
	if len(st.PublicPorts) != 1 || st.PublicPorts[0].Owner != "alice@laptop" || !st.PublicPorts[0].Online ||
		!strings.HasSuffix(st.PublicPorts[0].Address, ":"+strconv.Itoa(port)) {
		t.Errorf("public ports %+v", st.PublicPorts)
	}
	if dn := st.Denials[0]; dn.Identity != "mallory@pc" || dn.Destination != echo || dn.Code != wire.CodePolicyDenied || dn.Action != "dial" || dn.Reason == "" {
		t.Errorf("denial %+v", dn)
	}
	if st.PolicyRevision != d.Policy().Revision() {
		t.Errorf("policy revision %q; want %q", st.PolicyRevision, d.Policy().Revision())
	}

	pub := waitAudit(t, cfg.AuditLog, "the public session", func(l map[string]any) bool { return l["action"] == "public" })
	if pub["destination"] != fmt.Sprintf("public TCP port %d", port) || pub["bytes_up"] != 2.0 || pub["bytes_down"] != 2.0 ||
		!strings.HasPrefix(fmt.Sprint(pub["dialed"]), "agent alice@laptop") {
		t.Errorf("public session line %v", pub)
	}

	// The agent stops (Ctrl-C): its control session's line says it ended it.
	stopAgent()
	waitAudit(t, cfg.AuditLog, "the agent's control session", func(l map[string]any) bool {
		return l["action"] == "listen" && l["identity"] == "alice@laptop" && l["ended_by"] == "client" && l["end_code"] == "unregister" &&
			l["decision"] == "allow" && l["transport"] == "quic"
	})

	_ = tunnel.Close()
	poll(t, "the tunnel leaving the live view", func() bool {
		st, err = ac.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range st.Sessions {
			if s.Action == "dial" {
				return false
			}
		}
		return true
	})
}

// The ring of recent denials holds the newest maxDenials, oldest first.
func TestDenialRingBounded(t *testing.T) {
	t.Parallel()
	var r denialRing
	for i := range maxDenials + 7 {
		r.add(admin.Denial{Destination: strconv.Itoa(i)})
	}
	l := r.list()
	if len(l) != maxDenials || l[0].Destination != "7" || l[len(l)-1].Destination != strconv.Itoa(maxDenials+6) {
		t.Fatalf("ring holds %d, first %q, last %q", len(l), l[0].Destination, l[len(l)-1].Destination)
	}
}
