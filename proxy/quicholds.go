package proxy

import (
	"sync"

	"github.com/quic-go/quic-go"
)

// connHolds counts, per agent's QUIC connection, the dialers' sessions relayed
// over streams the server opened on it (reverse.go). Those streams are not the
// connection's own requests, which serveQUICConn waits for: during a drain it
// waits for these too, so that closing an agent's connection once its control
// stream ended does not cut the sessions the agent still serves.
type connHolds struct {
	mu   sync.Mutex
	n    map[*quic.Conn]int
	idle map[*quic.Conn]chan struct{} // closed when the count drops to zero
}

// hold counts one session on c until release is called (once or more).
func (h *connHolds) hold(c *quic.Conn) (release func()) {
	h.mu.Lock()
	if h.n == nil {
		h.n = make(map[*quic.Conn]int)
	}
	h.n[c]++
	h.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			if h.n[c]--; h.n[c] > 0 {
				return
			}
			delete(h.n, c)
			if ch, ok := h.idle[c]; ok {
				close(ch)
				delete(h.idle, c)
			}
		})
	}
}

// none returns a channel that is closed once c holds no session.
func (h *connHolds) none(c *quic.Conn) <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	ch := h.idle[c]
	if ch == nil {
		ch = make(chan struct{})
		if h.n[c] == 0 {
			close(ch)
			return ch
		}
		if h.idle == nil {
			h.idle = make(map[*quic.Conn]chan struct{})
		}
		h.idle[c] = ch
	}
	return ch
}
