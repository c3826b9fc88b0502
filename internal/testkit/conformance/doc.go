// Package conformance reads TP's protocol conformance corpus (docs/conformance:
// the exchanges of docs/PROTOCOL.md as data, with the answer each one must get)
// and runs it: its tests play the client against the real TP server (tpd
// in-process on loopback, with its embedded CA, OPA policy and QUIC), and play
// the server against TP's real client (clients.Dialer) and agent
// (clients.Agent). The corpus defines the bytes: the runners send them with
// crypto/tls and quic-go directly, not with TP's wire code.
// docs/conformance/README.md describes the format for runners in other languages.
package conformance
