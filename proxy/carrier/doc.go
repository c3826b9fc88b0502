// Package carrier is the server end of the stream carriers (docs/PROTOCOL.md,
// "Carriers"): the server's QUIC transport reads from a Mux, which merges the
// UDP socket's datagrams with the QUIC packets that arrive over the stream
// carriers (a TLS stream with ALPN "tp-carrier/1", a WebSocket or HTTP
// requests on the website side). Each carrier session gets a virtual address
// of its own, so quic-go sees one more client address, and a client that
// moves from UDP to a carrier (or from one carrier session to the next) keeps
// its QUIC connection: quic-go sees the new address as a migration and
// validates the path. The QUIC handshake still requires the device
// certificate: a carrier moves packets and decides nothing.
//
// The UDP path stays what it was: Mux offers quic-go the socket's own batched
// reads (recvmmsg), GSO, ECN and DF, and only packets for a virtual address
// take the carrier route. A carrier packet that arrives while the reader waits
// on the socket interrupts the wait with a read deadline in the past (a
// netpoller operation, no system call).
//
// The package knows nothing of the proxy's sessions: package proxy routes the
// carriers' ALPN and paths here, and tells the Mux which device each QUIC
// connection belongs to (AddConn), which proves the carrier sessions it runs
// over.
package carrier
