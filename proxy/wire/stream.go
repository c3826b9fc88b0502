package wire

import (
	"crypto/tls"
	"net"
	"time"
)

// Stream is one request's byte stream: a TLS connection (TLS transport) or a QUIC
// stream (QUIC transport). CloseWrite half-closes the sending direction.
type Stream interface {
	net.Conn
	CloseWrite() error
}

var _ Stream = (*tls.Conn)(nil)

// HelloWriteTimeout bounds writing a hello or a report to a peer that does not read.
const HelloWriteTimeout = 5 * time.Second
