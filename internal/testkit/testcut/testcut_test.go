package testcut

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Each way a client can end a cut session, and the verdict on it: only a
// CutError around a reset or a truncated TLS session passes.
func TestVerdict(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want string // in the verdict; "" passes
	}{
		{"reset", &clients.CutError{Err: syscall.ECONNRESET}, ""},
		{"wrapped reset", &clients.CutError{Err: fmt.Errorf("read: %w", syscall.ECONNRESET)}, ""},
		{"truncated TLS", &clients.CutError{Err: wire.ErrTruncated}, ""},
		{"clean end", nil, "clean end"},
		{"EOF", io.EOF, "clean end"},
		{"hang", fmt.Errorf("read: %w", os.ErrDeadlineExceeded), "heard nothing"},
		{"bare reset", syscall.ECONNRESET, "want a *clients.CutError"},
		{"cut by something else", &clients.CutError{Err: errors.New("bad record MAC")}, "want a reset"},
	} {
		got := verdict("the dialer", tc.err)
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("%s: verdict %q; want %q", tc.name, got, tc.want)
		}
	}
}
