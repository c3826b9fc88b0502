package wire

import "time"

// tp-mux/1 (docs/PROTOCOL.md, section 9.9): many TP sessions as streams of
// one TLS connection, multiplexed by proxy/mux.

// ALPNMux selects tp-mux/1 on the TCP port. A client offers it before "tp/1";
// a server that selects it runs the multiplexer on the connection.
const ALPNMux = "tp-mux/1"

// The bounds of a tp-mux/1 connection both ends know.
const (
	// MuxMaxStreams is how many streams may be open at once on one
	// connection; a client that opens more has its connection ended.
	MuxMaxStreams = 1000
	// MuxMaxPayload is the largest frame payload either end sends and accepts.
	MuxMaxPayload = 1<<16 - 1
	// MuxStreamWindow is each stream's first receive window in each direction
	// (the bytes one end may send before the other grants more).
	MuxStreamWindow = 128 << 10
	// MuxMaxStreamWindow is how far a stream's window may grow.
	MuxMaxStreamWindow = 4 << 20
	// MuxPing is how often a client pings; MuxDead is how long an end waits
	// for any frame before it cuts the connection.
	MuxPing = 15 * time.Second
	MuxDead = 60 * time.Second
)
