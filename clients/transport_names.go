package clients

import (
	"context"
	"crypto/tls"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// How a stream to the TP server is obtained lives in package clients/transport;
// the names callers of this package use are kept here.

// Transports a Dialer can use.
const (
	// TransportAuto races QUIC over UDP against QUIC over the stream carriers,
	// with TLS last (carrier_auto.go; with Carrier "udp", QUIC with a head start
	// against TLS), and remembers the winner per server and network in the
	// Dialer's Cache.
	TransportAuto = transport.Auto
	// TransportQUIC opens one stream per request on a shared QUIC connection.
	TransportQUIC = transport.QUIC
	// TransportTLS opens one TLS-over-TCP connection per request.
	TransportTLS = transport.TLS
)

// TransportCache remembers, per server and network, which transport and
// carrier worked (transport.Cache).
type TransportCache = transport.Cache

// TicketCache is a tls.ClientSessionCache whose tickets are bound to the
// device certificate they were made with (transport.TicketCache).
type TicketCache = transport.TicketCache

// DefaultTransportCacheTTL is how long an auto race result is trusted.
const DefaultTransportCacheTTL = transport.DefaultCacheTTL

// DefaultFallbackTTL is how long a fallback (a carrier other than UDP, or the
// plain TLS transport) is remembered (transport.DefaultFallbackTTL).
const DefaultFallbackTTL = transport.DefaultFallbackTTL

// UnreachableError is a connection to the TP server that could not be made:
// every transport and carrier tried failed (transport.UnreachableError).
type UnreachableError = transport.UnreachableError

// ErrCertificateRejected matches a TLS session the server ended with an alert
// during the handshake: the client certificate was refused. The alert does not
// say why; Client.WhyRejected asks the server.
var ErrCertificateRejected = transport.ErrCertificateRejected

// DiscoveryTimeout bounds the fetch of a server's discovery document.
const DiscoveryTimeout = transport.DiscoveryTimeout

// FetchDiscovery GETs and parses the transport discovery document at url
// (transport.FetchDiscovery).
func FetchDiscovery(ctx context.Context, url string, tlsCfg *tls.Config, supports ...string) (wire.Discovery, error) {
	return transport.FetchDiscovery(ctx, url, tlsCfg, supports...)
}

// NetworkID names the network this host reaches server (host:port) through,
// or "" when the system does not say (transport.NetworkID).
func NetworkID(server string) string { return transport.NetworkID(server) }
