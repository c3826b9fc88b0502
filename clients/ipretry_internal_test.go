package clients

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// tp ip pointed at an address where nothing listens (the bad input: a
// loopback port that refuses TCP connections) says in one sentence that
// nothing listens there and when it tries again, with the attempts' raw
// errors only at debug level.
func TestIPRetryLine(t *testing.T) {
	t.Parallel()
	addr := testnet.Refusing(t)
	tun := &IPTunnel{Server: addr, ProxyName: "proxy.test", TLSConfig: &tls.Config{}, Transport: "tls", DialTimeout: 10 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := tun.session(ctx, nil, nil, slog.New(slog.DiscardHandler))
	if ue := (*UnreachableError)(nil); !errors.As(err, &ue) {
		t.Fatalf("tp ip to %s, where nothing listens, failed with %v (%T); want an *UnreachableError", addr, err, err)
	}
	var buf bytes.Buffer
	logRetry(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})), err, 2*time.Second)
	line := buf.String()
	for _, want := range []string{"tp ip: cannot reach the TP server at " + addr + ": nothing listens there", "Next attempt in 2s."} {
		if !strings.Contains(line, want) {
			t.Errorf("tp ip's retry line is %q; want %q in it", line, want)
		}
	}
	if strings.Contains(line, "dial tcp") || strings.Count(line, "\n") != 1 {
		t.Errorf("tp ip's retry line is %q; want one sentence without the raw dial errors (they go to the debug log)", line)
	}
}
