// Package masque is the tunnel end of the MASQUE proxying TP serves on its
// proxy names: CONNECT-UDP flows (RFC 9298) and CONNECT-IP tunnels (RFC 9484).
//
// A CONNECT-UDP flow (udp.go) relays the client's HTTP Datagrams (QUIC
// DATAGRAM frames on HTTP/3) and DATAGRAM capsules on the request stream to a
// connected UDP socket, within the flow's bounds (UDPLimits), and counts what
// it relays and drops (UDPCounters).
//
// A CONNECT-IP tunnel (iptunnel.go) has a tun device of its own ("tpip%d"),
// routes for the addresses assigned to the peer through it, and a hook
// program run with TUN_DEV_NAME and TUN_CLIENT_ID (the seed's jtunnel
// contract). The policy decides which prefixes and protocols the peer may
// reach and optionally its addresses; the tunnel holds every packet to that
// decision: a packet from the peer must come from an address assigned to it
// and go to a granted prefix and protocol, a packet to the peer must come
// from a granted prefix. A re-check that narrows the grant is applied in
// place (IPTunnel.Regrant). docs/IP.md is the user's description.
//
// Package proxy serves the requests (identity, policy decision, the
// destination's socket, the session's record) and hands this package the
// request's stream (AcceptUDP, IPTunnel.Attach); this package knows nothing
// of the proxy's sessions.
package masque
