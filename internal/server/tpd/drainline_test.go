package tpd

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// dialOnLine is a log handler that, on the record whose message starts with
// prefix, connects to addr over TCP before the record is written, and sends
// the result on got.
type dialOnLine struct {
	slog.Handler
	prefix, addr string
	got          chan error
}

func (h *dialOnLine) Handle(ctx context.Context, r slog.Record) error {
	if strings.HasPrefix(r.Message, h.prefix) {
		c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
		if c != nil {
			c.Close()
		}
		select {
		case h.got <- err:
		default:
		}
	}
	return h.Handler.Handle(ctx, r)
}

func (h *dialOnLine) WithAttrs(as []slog.Attr) slog.Handler {
	return &dialOnLine{h.Handler.WithAttrs(as), h.prefix, h.addr, h.got}
}

func (h *dialOnLine) WithGroup(g string) slog.Handler {
	return &dialOnLine{h.Handler.WithGroup(g), h.prefix, h.addr, h.got}
}

// TestDrainLineMeansRefused: once tpd logs "draining: no new connections", a
// new TCP connection is refused. The log handler connects at the moment the
// line is logged, so the order is checked, not a race: the line used to come
// before the listeners closed, and a client (TestDrain's, under load) that
// connected on reading it reached a listener still open.
//
// The port is below the kernel's ephemeral range (testnet.FreePort): a port
// the kernel handed out for ":0" goes back to the next ":0" bind once tpd
// lets it go, and under load one did, between the close and the check: a
// parallel test's Listen took the TCP port, found its UDP port still held by
// this tpd, closed it again, and the check's connection, taken and then
// reset, read "connection reset by peer".
func TestDrainLineMeansRefused(t *testing.T) {
	t.Parallel()
	cfg := config.DefaultServer()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.PolicyTimeout = 5 * time.Second
	cfg.ShutdownTimeout = 10 * time.Second
	if _, err := Init(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(allowAlice), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := Listen(testnet.FreeAddr(t, "tcp+udp").String(), true)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = ln.Addr().String()
	h := &dialOnLine{Handler: slog.NewTextHandler(&testlog.Buffer{}, nil), prefix: "draining:", addr: cfg.Listen, got: make(chan error, 1)}
	d, err := New(context.Background(), cfg, slog.New(h))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, ln) }()
	defer func() {
		stop()
		select {
		case <-done:
		case <-time.After(2 * time.Minute):
			t.Error("Serve did not return within 2 minutes of the stop")
		}
	}()
	// Serving: the listener takes connections.
	c, err := net.DialTimeout("tcp", cfg.Listen, 5*time.Second)
	if err != nil {
		t.Fatalf("tpd does not take connections before the stop: %v", err)
	}
	c.Close()

	stop()
	select {
	case err := <-h.got:
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("a TCP connection when tpd logged \"draining:\": %v; want connection refused", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("tpd logged no \"draining:\" line within a minute of the stop")
	}
}
