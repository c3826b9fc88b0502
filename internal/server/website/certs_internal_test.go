package website

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
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
	stopped := make(chan struct{})
	go func() { defer close(stopped); s.stopAndWait(10 * time.Second) }()
	// The operation ends once the stop began, and the stop waits for it.
	for deadline := time.Now().Add(10 * time.Second); ; {
		s.mu.Lock()
		stopping := s.stopping
		s.mu.Unlock()
		if stopping {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("stopAndWait did not begin within 10 s")
		}
		runtime.Gosched()
	}
	select {
	case <-stopped:
		t.Fatal("stopAndWait returned while a certificate lock was held")
	default:
	}
	if err := s.Unlock(ctx, "issue_cert_a.example"); err != nil {
		t.Fatal(err)
	}
	<-stopped
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
