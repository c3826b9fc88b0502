// Package wire is TP's protocol as both ends speak it, the reference
// implementation of docs/PROTOCOL.md: the framing and fields of every hello (ops
// dial, listen, accept and why) and of the session header and control frames, the
// refusal codes, the QUIC stream adapter and its application error codes, UDP
// capsules, DATAGRAM flow ids and the relay of a UDP flow, and the bridge that
// copies a session's bytes and turns any failure into an abort the peer sees
// (a TCP reset, a TLS session without close_notify, a QUIC stream reset with a
// code), never into a clean end.
//
// The server side (listener, demultiplexing, sessions, dialing, the reverse
// registry) lives in package proxy; the clients (tp, dlogin, tp expose) import
// this package and never the server. wire depends on no other TP package, on no
// policy engine, CA or configuration library: a client that links it stays small.
package wire
