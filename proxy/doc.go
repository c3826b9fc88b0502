// Package proxy is the server side of TP's data plane. It owns the public TLS
// listener and its ALPN demultiplexing (ALPN "tp/1" goes to the proxy, everything
// else to the website handler, except on the proxy names: there the HTTPS proxy
// for standard clients, httpproxy.go and docs/HTTP.md, with CONNECT-UDP in
// masque_udp.go and CONNECT-IP in connectip.go), the QUIC listener, the
// per-request proxy session (identity, hello, resolve, authorize, dial), the
// reverse listens, dials and public ports it serves, UDP flows, and the records
// op "why" answers from.
//
// What both ends of the protocol speak — hellos, codes, the session header,
// capsules, the QUIC stream adapter and the bridge — is package proxy/wire; this
// package uses it and adds only the server's decisions. The protocol families
// that need nothing of the sessions are packages of their own, which this
// package assembles: the stream carriers' packet mux under the QUIC transport
// is proxy/carrier (carrier.go); the CONNECT-UDP relay and the CONNECT-IP
// tunnels are proxy/masque (masque_udp.go and connectip.go serve their
// requests); the connections between server instances and their pool are
// proxy/peer (peer*.go decides what they carry); the reverse registry of
// agents, names, public ports and leases, and the reverse tunnels' URIs, byte
// streams and pools are proxy/reverse (reverse*.go and revtunnel*.go serve
// the listens, dials, public connections and tunnel requests).
//
// The package knows nothing about configuration files, OPA or step-ca: the caller
// passes TLS configurations, an identity function and an authz.Authorizer. The
// protocol it speaks is specified in docs/PROTOCOL.md.
package proxy
