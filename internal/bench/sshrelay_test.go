package bench

import (
	"bufio"
	"context"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// startRelayHalf runs one helper role in this process and returns the address
// it printed; a role that stops before printing it fails the test with its error.
func startRelayHalf(t *testing.T, ctx context.Context, role string, args ...string) string {
	t.Helper()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- runSSHRelayHelper(ctx, role, args, outW); outW.Close() }()
	lines := bufio.NewScanner(outR)
	if !lines.Scan() {
		t.Fatalf("%s printed no address: %v", role, <-done)
	}
	m := addrRe.FindStringSubmatch(lines.Text())
	if m == nil {
		t.Fatalf("%s printed %q, not its address", role, lines.Text())
	}
	go func() { _, _ = io.Copy(io.Discard, outR) }()
	return m[1]
}

// The Go SSH relay carries a tunnel from its client half's listener through a
// direct-tcpip channel to the server half's target, and its server half lets in
// only the key of -client-cert.
func TestSSHRelay(t *testing.T) {
	server, err := newBenchCA(filepath.Join(t.TempDir(), "server"))
	if err != nil {
		t.Fatal(err)
	}
	device, err := newBenchCA(filepath.Join(t.TempDir(), "device"))
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := newBenchCA(filepath.Join(t.TempDir(), "stranger"))
	if err != nil {
		t.Fatal(err)
	}
	echo := testnet.Echo(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := startRelayHalf(t, ctx, "ssh-relay-server", "-key", server.keyFile, "-client-cert", device.certFile, "-target", echo)
	cli := startRelayHalf(t, ctx, "ssh-relay-client", "-key", device.keyFile, "-server-cert", server.certFile, "-server", srv, "-target", echo)

	c, err := net.DialTimeout("tcp", cli, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo through the relay: %q, %v", got, err)
	}

	// A client key that is not -client-cert's is refused at login: the client
	// half fails to start and says why.
	err = runSSHRelayHelper(ctx, "ssh-relay-client", []string{"-key", stranger.keyFile,
		"-server-cert", server.certFile, "-server", srv, "-target", echo}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "unable to authenticate") {
		t.Errorf("a stranger's key logged in to the relay: %v", err)
	}
	// A server whose host key is not -server-cert's is refused by the client.
	err = runSSHRelayHelper(ctx, "ssh-relay-client", []string{"-key", device.keyFile,
		"-server-cert", stranger.certFile, "-server", srv, "-target", echo}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "host key mismatch") {
		t.Errorf("the client accepted a host key it was not given: %v", err)
	}
}
