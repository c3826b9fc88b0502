// Package transport is how a client of TP obtains a stream to the TP server,
// apart from what a request says on it: the TLS connections to the server
// (TLSSessions: a bounded number of handshakes at a time, one shared
// configuration, Config), the stream carriers a QUIC connection's packets go
// over when UDP does not get through (CarrierConn, CarrierDialer; MovingConn,
// which moves a live connection between them; StartNudges, the packet after
// a silence that makes the server follow a new address), whether a kept TLS
// connection is still open (ConnOpen), what a device remembers between
// processes to reach a server fast (Cache, the transport and carrier that
// worked per server and network; TicketCache, TLS session tickets bound to
// the device certificate), the network a host is on (NetworkID), the server's
// transport discovery document (FetchDiscovery), and the one sentence that
// says why the server could not be reached (UnreachableError, ReachCause).
//
// It knows no feature: a TCP dial, a UDP flow, an end-to-end attach and the
// agent are package clients' business, and this package imports no package
// of clients above it (internal/tests/layering checks this).
package transport
