package reverse

// The pools of a name's reverse tunnels: the tunnels (or tunnel requests)
// waiting to be taken, and the h2 tunnels requests are spread over.

import (
	"context"
	"sync"
	"time"
)

// WaitPool holds items (oldest first) and the takers waiting for one.
type WaitPool[T comparable] struct {
	mu      sync.Mutex
	items   []T
	waiters []chan T
}

// Put hands x to the oldest taker waiting, or keeps it.
func (p *WaitPool[T]) Put(x T) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.waiters) > 0 {
		ch := p.waiters[0]
		p.waiters = p.waiters[1:]
		ch <- x // buffered
		return
	}
	p.items = append(p.items, x)
}

// Take returns the newest item, waiting up to timeout for one.
func (p *WaitPool[T]) Take(ctx context.Context, timeout time.Duration, stop <-chan struct{}) (T, bool) {
	p.mu.Lock()
	if n := len(p.items); n > 0 {
		x := p.items[n-1]
		p.items = p.items[:n-1]
		p.mu.Unlock()
		return x, true
	}
	ch := make(chan T, 1)
	p.waiters = append(p.waiters, ch)
	p.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case x := <-ch:
		return x, true
	case <-t.C:
	case <-ctx.Done():
	case <-stop:
	}
	p.mu.Lock()
	for i, w := range p.waiters {
		if w == ch {
			p.waiters = append(p.waiters[:i], p.waiters[i+1:]...)
			p.mu.Unlock()
			var zero T
			return zero, false
		}
	}
	p.mu.Unlock()
	return <-ch, true // handed over just now
}

// Remove takes x out if it is still waiting.
func (p *WaitPool[T]) Remove(x T) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, y := range p.items {
		if y == x {
			p.items = append(p.items[:i], p.items[i+1:]...)
			return true
		}
	}
	return false
}

// SyncList is a small set with snapshots, and a channel closed at each change
// (Notify).
type SyncList[T comparable] struct {
	mu    sync.Mutex
	items []T
	ch    chan struct{}
}

// Add puts x in the set; remove takes it out again.
func (l *SyncList[T]) Add(x T) (remove func()) {
	l.mu.Lock()
	l.items = append(l.items, x)
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		for i, y := range l.items {
			if y == x {
				l.items = append(l.items[:i], l.items[i+1:]...)
				return
			}
		}
	}
}

// Changed is closed at the next Notify.
func (l *SyncList[T]) Changed() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ch == nil {
		l.ch = make(chan struct{})
	}
	return l.ch
}

// Notify closes the channel Changed returned.
func (l *SyncList[T]) Notify() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ch != nil {
		close(l.ch)
		l.ch = nil
	}
}

// Snapshot is a copy of the set.
func (l *SyncList[T]) Snapshot() []T {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]T(nil), l.items...)
}
