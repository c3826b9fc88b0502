//go:build unix

package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

// notifyContext is ctx, cancelled by Ctrl-C, SIGTERM or SIGHUP (ssh sends
// SIGHUP to its ProxyCommand when it exits). SIGPIPE is ignored: without that
// Go kills a program whose standard output breaks (ssh gone) on the spot, and tp
// could neither reset the session, so the far side learns of the cut, nor say
// why it ended; with it, the write fails and tp does both, as on Windows.
func notifyContext(ctx context.Context) (context.Context, context.CancelFunc) {
	signal.Ignore(syscall.SIGPIPE)
	return signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
}
