// Package proxy is TP's data plane. It owns the public TLS listener and its
// ALPN demultiplexing (ALPN "tp/1" goes to the proxy, everything else to the
// website handler), the wire protocol v1 framing (client and server hellos), the
// per-connection proxy session (identity, hello, resolve, authorize, dial) and the
// byte bridge that carries a session once it is established.
//
// The package knows nothing about configuration files, OPA or step-ca: the caller
// passes TLS configurations, an identity function and an authz.Authorizer. The
// protocol it speaks is specified in docs/PROTOCOL.md.
package proxy
