package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// systemd may name an abstract socket ("@name"): the message must arrive there.
func TestSDNotifyAbstractSocket(t *testing.T) {
	name := fmt.Sprintf("@tp-sdnotify-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", name)
	if err := sdNotify("READY=1"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(buf[:n]); got != "READY=1" {
		t.Fatalf("got %q, want READY=1", got)
	}
}

// Bad input: NOTIFY_SOCKET names a socket nobody listens on. The error names it;
// without NOTIFY_SOCKET nothing is sent and nothing fails.
func TestSDNotifyErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "gone.sock")
	t.Setenv("NOTIFY_SOCKET", missing)
	err := sdNotify("READY=1")
	if err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("sdNotify to a missing socket: err = %v, want one naming %s", err, missing)
	}
	t.Setenv("NOTIFY_SOCKET", "")
	if err := sdNotify("READY=1"); err != nil {
		t.Fatalf("without NOTIFY_SOCKET: %v", err)
	}
}
