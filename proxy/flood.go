package proxy

import (
	"context"
	"errors"
	"sync/atomic"
)

// Rapid reset (CVE-2023-44487 and its kin): a client opens requests and cancels
// each before its answer, and the server does the set-up of every one (a
// policy decision, a name lookup, a dial) for nothing, at the rate the client
// can send frames. Every connection that carries many requests (QUIC, tp-mux/1,
// HTTP/2 and HTTP/3 CONNECT) has a cancelFlood: it counts the requests its
// client cancelled before they were answered, and once those pass
// cancelFloodMin and outnumber the answered ones, the connection takes no
// further request (GOAWAY where the protocol has one, else it is closed), as
// the h2 servers patched for rapid reset do. A set-up under way when its client
// cancels is itself cancelled (its dial included), so it costs no destination
// connection.
const cancelFloodMin = 100

// errClientCancelled is the cause of a set-up whose client cancelled the
// request before the answer.
var errClientCancelled = errors.New("the client cancelled the request before its answer")

// cancelFlood is one connection's count of requests cancelled before their
// answer; its methods are safe on a nil receiver (a connection of one request).
type cancelFlood struct {
	cancelled, answered atomic.Int64
	tripped             atomic.Bool
	trip                func() // ends the connection's requests: GOAWAY or close
}

func newCancelFlood(trip func()) *cancelFlood { return &cancelFlood{trip: trip} }

// answeredOne counts a request that got its answer (ok or a refusal).
func (f *cancelFlood) answeredOne() {
	if f != nil {
		f.answered.Add(1)
	}
}

// cancelledOne counts a request its client cancelled before the answer, and
// trips the connection when that makes a flood.
func (f *cancelFlood) cancelledOne() {
	if f == nil {
		return
	}
	if n := f.cancelled.Add(1); n > cancelFloodMin && n > f.answered.Load() && f.tripped.CompareAndSwap(false, true) {
		f.trip()
	}
}

// Tripped reports whether the connection was ended as a flood.
func (f *cancelFlood) Tripped() bool { return f != nil && f.tripped.Load() }

// streamContext is implemented by a stream that says when its client cancelled
// it: a QUIC stream's context ends at the peer's STOP_SENDING or the end of the
// connection, a tp-mux/1 stream's at the peer's ABORT or the connection's end.
type streamContext interface {
	Context() context.Context
}

// floodKey carries a CONNECT connection's cancelFlood from http.Server's and
// http3.Server's ConnContext to the requests (httpconnect.go).
type floodKey struct{}

// countCancel counts a CONNECT request on its connection's cancelFlood (from
// ConnContext): cancelled when its client went away before the answer.
func countCancel(ctx context.Context, cancelled bool) {
	f, _ := ctx.Value(floodKey{}).(*cancelFlood)
	if cancelled {
		f.cancelledOne()
	} else {
		f.answeredOne()
	}
}
