package tpd

import (
	"os/exec"
	"runtime"
	"testing"
	"time"
)

// needTool returns the path of tool, which the calling test runs. It skips
// the test under go test -short, which runs without external tools, and fails
// it when tool is not installed; pkg is the Debian package that has it.
func needTool(t testing.TB, tool, pkg string) string {
	t.Helper()
	if testing.Short() {
		t.Skipf("runs %s (Debian's %s); skipped under -short", tool, pkg)
	}
	path, err := exec.LookPath(tool)
	if err != nil {
		t.Fatalf("%s is not installed (deploy/test.sh installs Debian's %s): %v", tool, pkg, err)
	}
	return path
}

// notify signals on ch without blocking. ch is buffered, and a signal in it
// means "at least once since the test last looked": a callback that blocked
// once the test stopped reading would hang the code that calls it, and so the
// test's cleanup that waits for that code to end.
func notify(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// stopBound bounds how long a cleanup waits for an agent or another goroutine
// of the test to end once it was told to: a hang fails the test now, with
// every goroutine's stack, instead of holding the test binary until its timeout.
const stopBound = 30 * time.Second

// waitEnd waits up to limit for ch to deliver the end of what, and reports
// whether it did; when it does not, the test fails with every goroutine's stack.
func waitEnd[T any](t testing.TB, what string, ch <-chan T, limit time.Duration) (v T, ok bool) {
	t.Helper()
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case v = <-ch:
		return v, true
	case <-timer.C:
		buf := make([]byte, 4<<20)
		buf = buf[:runtime.Stack(buf, true)]
		t.Errorf("%s did not end within %s of being told to stop; every goroutine:\n%s", what, limit, buf)
		return v, false
	}
}

// daemonStopBound bounds a daemon's stop: its drain (shutdown-timeout) and
// the admin socket's shutdown, with room for a loaded machine.
func daemonStopBound(shutdownTimeout time.Duration) time.Duration {
	return shutdownTimeout + 30*time.Second
}
