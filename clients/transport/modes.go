package transport

// Transports a Dialer can use.
const (
	// Auto races QUIC over UDP against QUIC over the stream carriers, with TLS
	// last (with Carrier "udp", QUIC with a head start against TLS), and
	// remembers the winner per server and network in a Cache.
	Auto = "auto"
	// QUIC opens one stream per request on a shared QUIC connection.
	QUIC = "quic"
	// TLS opens one TLS-over-TCP connection per request.
	TLS = "tls"
)
