package clients

import (
	"context"
	"crypto/tls"
	"time"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// How a stream to the TP server is obtained lives in package clients/transport;
// the names callers of this package use are kept here.

// Transports a Dialer can use.
const (
	// TransportAuto races QUIC over UDP against QUIC over the stream carriers,
	// with TLS last (transport/race.go; with Carrier "udp", QUIC with a head start
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

// The transport's defaults (package transport; docs/PROTOCOL.md section 9).
const (
	// DefaultDialTimeout bounds a Dialer's setup when Dialer.Timeout is zero.
	DefaultDialTimeout = transport.DefaultTimeout
	// DefaultHeadStart is how long auto waits for the QUIC handshake before it
	// also tries TLS.
	DefaultHeadStart = transport.DefaultHeadStart
	// DefaultCarrierHeadStart is how long auto gives QUIC over UDP alone before
	// it also tries the stream carriers.
	DefaultCarrierHeadStart = transport.DefaultCarrierHeadStart
	// DefaultUDPReprobe is how often a connection on a stream carrier checks
	// whether UDP gets through again.
	DefaultUDPReprobe = transport.DefaultUDPReprobe
	// DefaultCarrierStall is how long a carrier may deliver nothing before the
	// connection moves to the next fallback carrier.
	DefaultCarrierStall = transport.DefaultCarrierStall
	// DefaultCarrierKeepAlive is the QUIC keepalive of a Dialer whose Carrier
	// is not "udp" and whose KeepAlive is zero.
	DefaultCarrierKeepAlive = transport.DefaultCarrierKeepAlive
	// DefaultMaxQUICConns bounds the QUIC connections a Dialer holds to its
	// server when MaxQUICConns is zero.
	DefaultMaxQUICConns = transport.DefaultMaxQUICConns
	// DefaultQUICPoolIdle is how long a further QUIC connection is kept once
	// its last stream ended.
	DefaultQUICPoolIdle = transport.DefaultQUICPoolIdle
)

// CarrierAuto starts on UDP and moves to tls, then ws, when UDP gets no answer
// at connect or stops delivering later.
const CarrierAuto = transport.CarrierAuto

// Carriers lists the carriers a Dialer can use, in the order auto falls back.
var Carriers = []string{wire.CarrierUDP, wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP}

// ErrDialerClosed is returned by a Dialer after Close.
var ErrDialerClosed = transport.ErrClosed

// retryLine is transport.RetryLine.
func retryLine(err error, wait time.Duration) string { return transport.RetryLine(err, wait) }
