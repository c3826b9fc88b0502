//go:build windows

package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

// notifyContext is ctx, cancelled by Ctrl-C or Ctrl-Break (os.Interrupt) or by
// the console closing, the user logging off or the system shutting down (Go
// delivers those as SIGTERM). Windows has no SIGHUP, and a broken standard
// output is an ordinary write error there, no signal.
func notifyContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
}
