package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
)

// tpd users unbind against a tpd serve running in-process: a user bound to
// no account says nothing changed; the bad inputs (a user that does not
// exist, no USER) are refused with a sentence; each act reaches the audit
// log. (The unbinding of a bound user, on both stores, is the admin
// package's test.)
func TestUsersUnbind(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "data")
	audit := filepath.Join(t.TempDir(), "audit.log")
	if err := run(context.Background(), []string{"init", "--data-dir", dir}, new(bytes.Buffer), new(bytes.Buffer)); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "tpd.yaml")
	b, err := os.ReadFile(conf)
	if err != nil || !bytes.Contains(b, []byte("\naudit-log: \"\"\n")) {
		t.Fatalf("tpd.yaml as tpd init writes it has no audit-log: \"\" (%v):\n%s", err, b)
	}
	b = bytes.Replace(b, []byte("\naudit-log: \"\"\n"), []byte("\naudit-log: \""+audit+"\"\n"), 1)
	if err := os.WriteFile(conf, b, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	serveOut, serveErr := &testlog.Buffer{}, &testlog.Buffer{}
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--data-dir", dir, "--listen", "127.0.0.1:0"}, serveOut, serveErr)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			t.Error("tpd serve did not stop within 60s of its context's end")
		}
	})
	for deadline := time.Now().Add(60 * time.Second); !strings.Contains(serveOut.String(), "listening on"); {
		select {
		case err := <-done:
			done <- err // for the cleanup
			t.Fatalf("tpd serve ended: %v\n%s", err, serveErr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tpd serve did not say it listens within 60s:\n%s\n%s", serveOut.String(), serveErr.String())
		}
		time.Sleep(20 * time.Millisecond) // polling for readiness, bounded by the deadline
	}
	tpd := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := run(context.Background(), append(args, "--data-dir", dir), &out, &errOut)
		return out.String(), err
	}
	if _, err := tpd("enroll", "alice", "--device", "laptop"); err != nil {
		t.Fatal(err)
	}
	out, err := tpd("users", "unbind", "alice")
	if err != nil || out != "User alice is not bound to an account at the identity provider; nothing changed.\n" {
		t.Fatalf("tpd users unbind alice: %q, %v; want it to say nothing changed", out, err)
	}
	if _, err := tpd("users", "unbind", "nobody"); err == nil || !strings.Contains(err.Error(), "there is no user nobody; tpd users lists them") {
		t.Fatalf("tpd users unbind nobody: %v; want a refusal saying there is no such user", err)
	}
	if _, err := tpd("users", "unbind"); err == nil || !strings.Contains(err.Error(), "needs USER") {
		t.Fatalf("tpd users unbind without USER: %v; want a usage error", err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		b, _ := os.ReadFile(audit)
		if bytes.Contains(b, []byte(`"act":"unbind_user","subject":"alice"`)) && bytes.Contains(b, []byte(`"act":"unbind_user","subject":"nobody"`)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the audit log lacks the unbind acts:\n%s", b)
		}
		time.Sleep(20 * time.Millisecond) // polling the file, bounded by the deadline
	}
}
