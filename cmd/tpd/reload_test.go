package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
)

// tpd reload against a tpd serve running in-process, from its first start (which
// writes tpd.yaml): each reload prints only the settings whose values changed,
// as tpd.yaml spells them, or that nothing changed. Bad input: a tpd.yaml edited
// in one key (hello-timeout), with sites untouched, empty and then not. tpd
// reload once printed "sites: [] → []" for the first start's sites, whole site
// lists as Go structs ("sites: [{www.test /srv/www }] → [...]") and durations
// as 1m0s.
func TestReloadPrintsOnlyWhatChanged(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "data")
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
			t.Fatalf("tpd serve ended: %v\n%s", err, serveErr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tpd serve did not say it listens within 60s:\n%s\n%s", serveOut.String(), serveErr.String())
		}
		time.Sleep(20 * time.Millisecond) // polling for readiness, bounded by the deadline
	}
	edit := func(old, new string) {
		t.Helper()
		path := filepath.Join(dir, "tpd.yaml")
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), old) {
			t.Fatalf("tpd.yaml has no %q:\n%s", old, b)
		}
		if err := os.WriteFile(path, []byte(strings.Replace(string(b), old, new, 1)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	reload := func() string {
		t.Helper()
		var out, errOut strings.Builder
		if err := run(context.Background(), []string{"reload", "--data-dir", dir}, &out, &errOut); err != nil {
			t.Fatalf("tpd reload: %v\n%s%s", err, out.String(), errOut.String())
		}
		return out.String()
	}
	// reloaded is what tpd reload printed, less its last line (the policy
	// revision, which this test does not change).
	revision := regexp.MustCompile(`Policy revision: [0-9a-f]+\n$`)
	reloaded := func() string {
		t.Helper()
		out := reload()
		if !revision.MatchString(out) {
			t.Errorf("tpd reload's output does not end with the policy revision:\n%s", out)
		}
		return revision.ReplaceAllString(out, "")
	}
	noGoSyntax := func(out string) {
		t.Helper()
		for _, bad := range []string{"{", "&{", "map[", "sites", "1m0s"} {
			if strings.Contains(out, bad) {
				t.Errorf("tpd reload printed %q, of a setting that did not change or in Go's spelling:\n%s", bad, out)
			}
		}
	}

	edit("hello-timeout: 10s", "hello-timeout: 3s")
	out := reloaded()
	if want := "Reloaded; changed:\n  hello-timeout: 10s → 3s\n"; out != want {
		t.Errorf("tpd reload of hello-timeout printed:\n%s\nwant:\n%s", out, want)
	}
	noGoSyntax(out)

	out = reloaded()
	if want := "Reloaded; nothing changed in tpd.yaml.\n"; out != want {
		t.Errorf("tpd reload of an unchanged tpd.yaml printed:\n%s\nwant:\n%s", out, want)
	}
	noGoSyntax(out)

	root := t.TempDir()
	edit("sites: []\n", "sites:\n  - {name: \"www.test\", root: \""+root+"\"}\n")
	out = reloaded()
	if want := "Reloaded; changed:\n  sites: added {name: www.test, root: " + root + "}\n"; out != want {
		t.Errorf("tpd reload adding a site printed:\n%s\nwant:\n%s", out, want)
	}

	edit("site-upstream-timeout: 1m0s", "site-upstream-timeout: 90s")
	out = reloaded()
	if want := "Reloaded; changed:\n  site-upstream-timeout: 1m → 1m30s\n"; out != want {
		t.Errorf("tpd reload of site-upstream-timeout beside an unchanged site printed:\n%s\nwant:\n%s", out, want)
	}
	noGoSyntax(out)
}
