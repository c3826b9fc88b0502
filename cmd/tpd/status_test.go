package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/proxy"
)

// The bad input: names and reasons holding a newline, an ANSI escape, a tab
// and invalid UTF-8, as a hostile client or a careless one might have them
// recorded. tpd status prints each row on one line, with no raw control
// character reaching the terminal.
func TestStatusTableQuotesControlCharacters(t *testing.T) {
	now := time.Date(2026, 12, 2, 9, 0, 0, 0, time.UTC)
	hostile := "evil\nFAKE ROW\x1b[2J\tx\xff"
	st := admin.Status{
		Version: "v0.1.0", Time: now, Started: now.Add(-time.Hour), PolicyRevision: "abc",
		Sessions:    []proxy.LiveSession{{Identity: "alice@laptop", Transport: "tls", Action: "dial", Destination: hostile, Started: now}},
		Agents:      []proxy.Agent{{Identity: "bob@pc", Transport: "quic", Names: []string{"pc.rev.test"}}},
		PublicPorts: []proxy.PublicPort{{Exposure: "public TCP port 8080", Address: "tcp 127.0.0.1:8080", Owner: "bob@pc", Online: true}},
		Denials:     []admin.Denial{{Time: now, Identity: "mallory@pc", Action: "dial", Destination: "x:1", Reason: hostile}},
		Grants: []admin.Grant{{Device: "alice@grant-aaaa", Scope: "expose:ci", GrantedBy: "alice@laptop", Created: now, Agent: true},
			{Device: "alice@grant-bbbb", Scope: "expose:ci", GrantedBy: "alice@laptop", Created: now, Revoked: true, Why: hostile}},
		Instances: []admin.Instance{{Name: "a/1", PeerAddress: "10.0.0.1:443", PolicyRevision: "abc", HeartbeatAge: 0.4, Self: true},
			{Name: hostile, PeerAddress: "10.0.0.2:443", PolicyRevision: "old", HeartbeatAge: 40, Draining: true, Stale: true}},
	}
	var b bytes.Buffer
	if err := printStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	if strings.ContainsAny(out, "\x1b\t\xff") || strings.Contains(out, "\nFAKE ROW") {
		t.Fatalf("a raw control character reached the table:\n%q", out)
	}
	for _, want := range []string{"SESSIONS (1)", `"evil\nFAKE ROW\x1b[2J\tx\xff"`, "AGENTS (1)", "pc.rev.test", "PUBLIC PORTS (1)",
		"tcp 127.0.0.1:8080", "online", "RECENT DENIALS (1", "mallory@pc", "up 1h0m0s",
		"INSTANCES (2)", "a/1 (this one)", "GRANTS (2)", "alice@grant-aaaa", "agent connected", "revoked: \"evil", "10.0.0.1:443", "400ms ago", "serving", "old (differs)", "40s ago", "draining, stale (no heartbeat"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}
