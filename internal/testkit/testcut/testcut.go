package testcut

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Check fails the test unless err reports the cut the test caused: a
// *clients.CutError holding a TCP reset, a QUIC stream reset, or a TLS session
// that ended without close_notify (wire.ErrTruncated). The test's own deadline
// is a hang, and EOF a silent truncation. who names the side that saw err.
func Check(t testing.TB, who string, err error) {
	t.Helper()
	if msg := verdict(who, err); msg != "" {
		t.Fatal(msg)
	}
}

// verdict is what is wrong with err as the report of a cut, or "" if nothing is.
func verdict(who string, err error) string {
	switch {
	case err == nil || errors.Is(err, io.EOF):
		return fmt.Sprintf("%s saw a clean end (%v); want the cut reported", who, err)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Sprintf("%s heard nothing until its own deadline: the cut was not passed on (%v)", who, err)
	}
	var cut *clients.CutError
	if !errors.As(err, &cut) {
		return fmt.Sprintf("%s saw %v (%T); want a *clients.CutError", who, err, err)
	}
	if _, reset := wire.StreamResetCode(err); reset || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, wire.ErrTruncated) {
		return ""
	}
	return fmt.Sprintf("%s saw %v (%T); want a reset or wire.ErrTruncated", who, cut.Err, cut.Err)
}
