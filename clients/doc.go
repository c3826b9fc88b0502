// Package clients is TP's Go client library, what tp, dlogin and tp expose are
// made of: a device's files under $TP_HOME and its self-renewing certificate
// (Home, Client), dialing through a TP server over TLS or QUIC with an automatic
// choice between them (Dialer, TransportCache), bridging a dialed connection to
// stdin/stdout for ssh's ProxyCommand (Stdio), local TCP and UDP forwarders
// (Forwarder, UDPForwarder), the reverse agent that publishes local services
// under the server's reverse zone, publicly or end to end (Agent), and the
// sentences that say who cut a session and why (CutError, ExplainCut).
//
// How a stream to the server is obtained is package clients/transport: its
// Client holds the QUIC connections (a pool when the server allows no more
// streams on one), the TLS connections and their spares, the tp-mux/1
// connections, the stream carriers, the race between them and the moves
// between them, and what it learnt of the server. A dial here is parsing, the
// hello, and one call into it (transport.Client.RoundTrip) with the request
// (request.go: the hello exchange, early bytes, end-to-end TLS, the answer),
// which the transport runs on the stream it picked and runs again when the
// request's own rules (Trip.Retry) allow. The names callers
// use stay available here.
//
// It speaks the protocol through package proxy/wire and links no server code:
// no proxy, no policy engine, no CA (internal/tests/layering checks this).
package clients
