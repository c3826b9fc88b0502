// Package testcut holds the one verdict that tests of tpd and of TP's binaries
// give on a session that a fault cut short: TP's client must report it as a cut
// (a *clients.CutError holding a TCP reset, a QUIC stream reset, or a TLS session
// that ended without close_notify), never as a clean end and never by going
// silent until the test's own deadline.
//
// It owns that verdict only; the sockets a test cuts come from internal/testkit/testnet.
package testcut
