package main

import (
	"os"
	"os/signal"
	"syscall"
)

// forceOnSecondSignal calls force when a second SIGTERM or SIGINT arrives: the
// first one (which main's context turns into a drain) is counted here too.
// Calling stop stops listening.
func forceOnSecondSignal(force func()) (stop func()) {
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		for n := 0; ; {
			select {
			case <-sig:
				if n++; n == 2 {
					force()
					return
				}
			case <-done:
				return
			}
		}
	}()
	return func() {
		signal.Stop(sig)
		close(done)
	}
}
