package proxy

import (
	"context"
	"sync"
	"testing"
	"time"
)

// blockingDeadlines records read deadlines; setting a non-zero one waits for
// release, so that a test can hold the drain's hook in the middle of its work.
type blockingDeadlines struct {
	entered chan struct{}
	release chan struct{}
	mu      sync.Mutex
	last    time.Time
}

func (b *blockingDeadlines) SetReadDeadline(t time.Time) error {
	if !t.IsZero() {
		b.entered <- struct{}{}
		<-b.release
	}
	b.mu.Lock()
	b.last = t
	b.mu.Unlock()
	return nil
}

// A request read just as the drain begins: the drain's hook is setting the
// read deadline to "now" when the reader stops it and clears the deadline.
// stop must wait for the hook, so that the reader's clear is the last word;
// before, the hook's late "now" stuck and the session's first read failed with
// "deadline exceeded", which reached the client as a reset stream.
func TestCutReadOnDrainStopWaitsForTheHook(t *testing.T) {
	s := &Server{}
	s.draining, s.drain = context.WithCancel(context.Background())
	conn := &blockingDeadlines{entered: make(chan struct{}), release: make(chan struct{})}
	stop := s.cutReadOnDrain(conn)
	s.drain()
	<-conn.entered // the hook runs, and waits inside SetReadDeadline(now)

	finished := make(chan struct{})
	go func() {
		stop()
		_ = conn.SetReadDeadline(time.Time{}) // what readHello does after a hello
		close(finished)
	}()
	select {
	case <-finished:
		t.Fatal("stop returned while the drain's hook was still setting the deadline")
	case <-time.After(100 * time.Millisecond): // stop must still be waiting: nothing lets it go on
	}
	close(conn.release)
	<-finished
	conn.mu.Lock()
	defer conn.mu.Unlock()
	if !conn.last.IsZero() {
		t.Fatalf("the read deadline is %v after the reader cleared it: the drain's hook overwrote it", conn.last)
	}
}
