// Package reverse is the machinery of TP's reverse family that needs nothing
// of the proxy's sessions: what a reverse name, public port or pass-through
// server name is held by beyond its agent (holds.go: the holds saved across a
// restart, and the shared record of holds several server instances keep,
// with its leases), and the reverse tunnels of
// draft-kazuho-httpbis-reverse-tunnel (docs/HTTP.md §2): which request asks
// for one and what its URI names (target.go), the tunnels' byte streams
// (conn.go) and the pools of waiting tunnels (pool.go).
//
// Package proxy serves the requests (identity, policy decision, the session's
// record, the server's bounds) and hands this package what they carry: the
// request's path, header and response writer, and the tunnels it established;
// this package knows nothing of the proxy's sessions.
package reverse
