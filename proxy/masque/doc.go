// Package masque is the tunnel end of the MASQUE proxying TP serves on its
// proxy names: CONNECT-IP (RFC 9484) tunnels. A device with a verified
// certificate gets an IP tunnel with a tun device of its own ("tpip%d"),
// routes for the addresses assigned to the peer through it, and a hook
// program run with TUN_DEV_NAME and TUN_CLIENT_ID (the seed's jtunnel
// contract). The policy decides which prefixes and protocols the peer may
// reach and optionally its addresses; the tunnel holds every packet to that
// decision: a packet from the peer must come from an address assigned to it
// and go to a granted prefix and protocol, a packet to the peer must come
// from a granted prefix. A re-check that narrows the grant is applied in
// place (IPTunnel.Regrant). docs/IP.md is the user's description.
//
// Package proxy serves the request (identity, policy decision, session
// record, the HTTP/3 or HTTP/2 stream) and hands the tunnel its link to the
// peer (IPTunnel.Attach); this package knows nothing of the proxy's sessions.
package masque
