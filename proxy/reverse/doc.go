// Package reverse is the machinery of TP's reverse family that needs nothing
// of the proxy's sessions.
//
// The registry (registry.go) records which agent holds which reverse name,
// public port or pass-through server name: a claim is refused while another
// identity holds a key and taken over by a newer session of the same owner,
// an agent that ends keeps its keys for a grace period, and the sessions
// announced to an agent over TLS wait there until its accept connection
// pairs them (agent.go, where an Agent also opens its sessions over QUIC or
// TLS). public.go keeps the public ports open, also for exposures other
// instances serve, and the holds saved across a restart; leases.go the
// leases of a hold store several instances share (holds.go), and the fencing
// of what this instance could not renew in time.
//
// The reverse tunnels of draft-kazuho-httpbis-reverse-tunnel (docs/HTTP.md
// §2) have their URIs and ALPN fields here (target.go), their byte streams
// (conn.go) and the pools of waiting tunnels (pool.go).
//
// Package proxy serves the requests (identity, policy decision, the session's
// record, the server's bounds and counters) and hands this package what they
// carry: an Agent with its control stream, the names it was allowed, a dial's
// name to look up, the tunnel requests' paths and streams. It gives the
// Registry its log, its listeners and the service of a public port (Hooks);
// this package knows nothing of the proxy's sessions.
package reverse
