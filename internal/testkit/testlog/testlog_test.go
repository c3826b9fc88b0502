package testlog_test

import (
	"strings"
	"sync"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
)

// Writers and a reader at once (run with -race): every line arrives whole.
func TestBufferConcurrent(t *testing.T) {
	var b testlog.Buffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				_, _ = b.Write([]byte("line\n"))
				_ = b.String()
			}
		}()
	}
	wg.Wait()
	if got := strings.Count(b.String(), "line\n"); got != 800 {
		t.Fatalf("%d whole lines; want 800", got)
	}
}
