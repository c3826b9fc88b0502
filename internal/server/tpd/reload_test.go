package tpd

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/lib/config"
)

// Reload in-process. Bad inputs: a configuration that changes settings only a
// restart can change (names, quic, http-listen, ip-hook-timeout: the ip-* keys
// were once not compared at all, so a reload said nothing changed and applied
// nothing), and one that does not validate. Both
// are refused, the first naming each such key, and nothing is applied; a good
// one applies its limits, public ports, shutdown-timeout and log level at once
// and says what changed.
func TestReloadAppliesOrRefusesWhole(t *testing.T) {
	t.Parallel()
	d, _, _, _, _ := stoppableDaemon(t, allowAlice, time.Minute)
	next := *d.config()
	level := new(slog.LevelVar)
	d.SetReloader(func() (config.Server, error) { return next, nil }, level)

	next.Names = append(next.Names, "tp.example.org")
	next.QUIC = false
	next.HTTPListen = "127.0.0.1:0"
	next.IPHookTimeout += time.Second
	next.MaxConns = 7
	_, err := d.Reload(context.Background())
	if err == nil {
		t.Fatal("a reload that changes names, quic, http-listen and ip-hook-timeout was applied")
	}
	for _, want := range []string{"needs a restart", "names", "quic", "http-listen", "ip-hook-timeout"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %q", err, want)
		}
	}
	if got := d.proxy.Limits().MaxConns; got != 10000 {
		t.Errorf("a refused reload changed max-conns to %d", got)
	}

	next = *d.config()
	next.MaxConns = -1
	if _, err := d.Reload(context.Background()); err == nil || !strings.Contains(err.Error(), "max-conns -1") {
		t.Errorf("reload of max-conns -1: %v; want a refusal naming it", err)
	}

	next = *d.config()
	next.MaxConns, next.HelloTimeout = 7, 3*time.Second
	next.PublicPorts = "20000-20010"
	next.ShutdownTimeout = 2 * time.Second
	next.LogLevel = "debug"
	res, err := d.Reload(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	l := d.proxy.Limits()
	if l.MaxConns != 7 || l.HelloTimeout != 3*time.Second {
		t.Errorf("limits after the reload: %+v", l)
	}
	if !d.config().PublicPortAllowed("tcp", 20005) || d.config().ShutdownTimeout != 2*time.Second {
		t.Error("public-ports or shutdown-timeout not in force after the reload")
	}
	if level.Level() != slog.LevelDebug {
		t.Errorf("log level %s after the reload, want debug", level.Level())
	}
	joined := strings.Join(res.Changed, "\n")
	for _, want := range []string{"max-conns: 10000 → 7", "hello-timeout: 10s → 3s", `public-ports: "" → 20000-20010`, "shutdown-timeout: 1m → 2s", "log-level: info → debug"} {
		if !strings.Contains(joined, want) {
			t.Errorf("changes %q do not include %q", joined, want)
		}
	}
}

// Each reload leaves one admin line in the audit log: refused (with the reason
// naming the bad setting, the bad input here being max-conns -1), then ok with
// the settings it changed.
func TestReloadIsAudited(t *testing.T) {
	t.Parallel()
	auditPath := ""
	d, _, _, _, _ := stoppableDaemon(t, allowAlice, time.Minute, func(c *config.Server) {
		c.AuditLog = filepath.Join(c.DataDir, "audit.jsonl")
		auditPath = c.AuditLog
	})
	next := *d.config()
	d.SetReloader(func() (config.Server, error) { return next, nil }, new(slog.LevelVar))

	next.MaxConns = -1
	if _, err := d.Reload(context.Background()); err == nil {
		t.Fatal("max-conns -1 was applied")
	}
	refused := waitAudit(t, auditPath, "the refused reload's line", func(l map[string]any) bool {
		return l["act"] == "config_reload" && l["result"] == "refused"
	})
	if r, _ := refused["reason"].(string); !strings.Contains(r, "max-conns -1") {
		t.Errorf("refused reload's reason %q does not name max-conns -1", r)
	}

	next = *d.config()
	next.MaxConns = 7
	if _, err := d.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	ok := waitAudit(t, auditPath, "the applied reload's line", func(l map[string]any) bool {
		return l["act"] == "config_reload" && l["result"] == "ok"
	})
	if ch := fmt.Sprint(ok["changed"]); !strings.Contains(ch, "max-conns: 10000 → 7") || ok["via"] != "reload request" || ok["policy_revision"] == "" {
		t.Errorf("applied reload's line %v: want changed max-conns, via reload request and a policy revision", ok)
	}
}
