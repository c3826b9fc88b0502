package website

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// A server that stops waits for the certificate locks held at that moment
// to be released, and takes no new one: nothing is left in the storage's
// locks directory once StopAndWait returns, even while an operation was
// still under way when it began.
func TestStopAndWaitReleasesLocks(t *testing.T) {
	dir := t.TempDir()
	s := &trackedStorage{Storage: &certmagic.FileStorage{Path: dir}}
	ctx := context.Background()
	if err := s.Lock(ctx, "issue_cert_a.example"); err != nil {
		t.Fatal(err)
	}
	go func() { // an operation that ends a moment after the stop began
		time.Sleep(200 * time.Millisecond)
		_ = s.Unlock(ctx, "issue_cert_a.example")
	}()
	s.stopAndWait(10 * time.Second)
	entries, err := os.ReadDir(filepath.Join(dir, "locks"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Fatalf("%d lock files left after the stop: %v", len(entries), entries)
	}
	if err := s.Lock(ctx, "issue_cert_b.example"); !errors.Is(err, errStopping) {
		t.Fatalf("a lock after the stop: %v; want it refused", err)
	}
}
