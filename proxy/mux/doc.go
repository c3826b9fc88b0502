// Package mux is TP's stream multiplexer over one reliable, ordered byte
// stream (a TLS session): many TP sessions as streams of one connection,
// each with its own flow control, a clean end (FIN) told apart from a cut
// (ABORT, or the connection's death), and bounds on everything a peer can
// make the other end hold. docs/PROTOCOL.md, section 9.9, is its
// specification; it carries tpd's ALPN tp-mux/1 (tp forward to tpd) and the
// end-to-end carriers of protected names (tp-e2e-mux/1, section 11.4.1).
//
// It is TP's own rather than yamux: a stream that ends because its
// connection died, or because the other end aborted it, must read as a cut
// (wire.ErrTruncated), never as an end of stream, and yamux's streams read
// io.EOF when their session dies and cannot be reset one by one.
package mux
