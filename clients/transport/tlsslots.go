package transport

import (
	"context"
	"sync"
	"sync/atomic"
)

// maxTLSHandshakes bounds the TLS handshakes a TLSSessions has in flight to its
// server. tpd closes a source address's connections beyond max-handshakes-per-ip
// (default 128) unfinished handshakes right after accept, to keep one host from
// holding its slots with handshakes that never end; a burst of local connections
// on `tp forward --transport tls` (each its own TLS connection) would otherwise
// lose its excess to that bound as resets. Below it, the excess waits here, within
// the dial's timeout, and the server's bounds are met rather than tripped.
const maxTLSHandshakes = 64

// handshakeSlots is a TLSSessions' semaphore of TLS handshakes in flight.
type handshakeSlots struct {
	once sync.Once
	ch   chan struct{}
	// started counts the TLS connections begun (TLSSessions.Connect):
	// tests tell from it whether sessions rode spares.
	started atomic.Int64
}

// acquire takes a slot, waiting while maxTLSHandshakes are in flight, until ctx
// ends; release gives it back.
func (h *handshakeSlots) acquire(ctx context.Context) (release func(), err error) {
	h.once.Do(func() { h.ch = make(chan struct{}, maxTLSHandshakes) })
	select {
	case h.ch <- struct{}{}:
		return func() { <-h.ch }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
