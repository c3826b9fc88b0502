package e2e

import (
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// notifySocket is the datagram socket systemd listens on for a Type=notify
// service; the test plays systemd's part.
type notifySocket struct {
	conn *net.UnixConn
	path string
}

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &notifySocket{conn: conn, path: path}
}

// next returns the next message, failing the test if none comes within 30s.
func (n *notifySocket) next(t *testing.T, waitingFor string) string {
	t.Helper()
	buf := make([]byte, 4096)
	n.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	k, err := n.conn.Read(buf)
	if err != nil {
		t.Fatalf("waiting for %s on NOTIFY_SOCKET: %v", waitingFor, err)
	}
	return string(buf[:k])
}

// A real tpd run as systemd runs a Type=notify service: READY=1 only once the
// public port and the admin socket answer, RELOADING=1 (with MONOTONIC_USEC)
// then READY=1 around a SIGHUP reload, STOPPING=1 when SIGTERM starts the drain,
// and exit status 0. Before sd_notify, tpd sent nothing and systemd would have
// timed out its start (Type=notify) or called it started before it listened.
func TestSystemdNotify(t *testing.T) {
	parallel(t)
	ns := listenNotify(t)
	p := startTPD(t, filepath.Join(t.TempDir(), "tpdata"), "127.0.0.1:0", []string{"NOTIFY_SOCKET=" + ns.path})

	if got := ns.next(t, "READY=1"); got != "READY=1" {
		t.Fatalf("first notification = %q, want READY=1", got)
	}
	// Ready means ready: the public port and the admin socket accept now.
	for _, addr := range [][2]string{{"tcp", p.Addr}, {"unix", filepath.Join(p.DataDir, "admin.sock")}} {
		c, err := net.DialTimeout(addr[0], addr[1], 5*time.Second)
		if err != nil {
			t.Fatalf("after READY=1, %s %s does not accept: %v", addr[0], addr[1], err)
		}
		c.Close()
	}

	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	reloading := ns.next(t, "RELOADING=1")
	var now unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(reloading, "\n")
	if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
		t.Fatalf("on SIGHUP tpd sent %q, want RELOADING=1 and MONOTONIC_USEC=…", reloading)
	}
	usec, err := strconv.ParseInt(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64)
	if err != nil || usec <= 0 || usec > now.Nano()/1000 {
		t.Fatalf("MONOTONIC_USEC in %q is not a CLOCK_MONOTONIC time before now (%d µs)", reloading, now.Nano()/1000)
	}
	if got := ns.next(t, "READY=1 after the reload"); got != "READY=1" {
		t.Fatalf("after the reload tpd sent %q, want READY=1", got)
	}

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if got := ns.next(t, "STOPPING=1"); got != "STOPPING=1" {
		t.Fatalf("on SIGTERM tpd sent %q, want STOPPING=1", got)
	}
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatal("tpd did not exit within 30s of SIGTERM")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("tpd exited with status %d after SIGTERM, want 0", code)
	}
}
