//go:build unix

package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// notifyContext is ctx, cancelled by Ctrl-C, SIGTERM or SIGHUP (ssh sends
// SIGHUP to its ProxyCommand when it exits). SIGPIPE is ignored: without that
// Go kills a program whose standard output breaks (ssh gone) on the spot, and tp
// could neither reset the session, so the far side learns of the cut, nor say
// why it ended; with it, the write fails and tp does both, as on Windows.
// A hang-up ends ctx with errHangUp as its cause.
func notifyContext(ctx context.Context) (context.Context, context.CancelFunc) {
	signal.Ignore(syscall.SIGPIPE)
	ctx, cancel := context.WithCancelCause(ctx)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		select {
		case s := <-sigs:
			if s == syscall.SIGHUP {
				cancel(errHangUp)
			} else {
				cancel(fmt.Errorf("%s signal received", s))
			}
		case <-ctx.Done():
		}
	}()
	return ctx, func() { signal.Stop(sigs); cancel(context.Canceled) }
}
