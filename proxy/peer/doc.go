// Package peer is the transport between TP server instances (docs/SCALE.md,
// "Peering"): TLS 1.3 on the shared port with ALPN tp-peer/1, both sides
// presenting node certificates of TP's own CA, one session per connection,
// and a pool per instance that keeps handshaken connections ready so that a
// forwarded session costs no handshake.
//
// What travels over a peer connection, and who may be forwarded where, is
// package proxy's: it routes reverse names to the instance that serves them
// and serves other instances' forwards. This package knows nothing of
// sessions, the reverse registry or the policy.
package peer
