// Package clients is TP's Go client library, what tp, dlogin and tp expose are
// made of: a device's files under $TP_HOME and its self-renewing certificate
// (Home, Client), dialing through a TP server over TLS or QUIC with an automatic
// choice between them (Dialer, TransportCache), bridging a dialed connection to
// stdin/stdout for ssh's ProxyCommand (Stdio), local TCP and UDP forwarders
// (Forwarder, UDPForwarder), the reverse agent that publishes local services
// under the server's reverse zone, publicly or end to end (Agent), and the
// sentences that say who cut a session and why (CutError, ExplainCut).
//
// The transports' parts that know no feature (the TLS connections to the
// server, the stream carriers and the moves between them, the caches of what
// worked and of TLS session tickets, the network a host is on, the discovery
// document, the sentence that says why the server could not be reached) are
// in package clients/transport; the names callers use stay available here.
// The Dialer still picks the way to the server and applies the retry rules
// (transport.go, quic.go, quicpool.go, spare.go, tlsmux.go).
//
// It speaks the protocol through package proxy/wire and links no server code:
// no proxy, no policy engine, no CA (internal/tests/layering checks this).
package clients
