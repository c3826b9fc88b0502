package wire

// Carriers: what carries TP's QUIC packets when UDP does not get through
// (docs/PROTOCOL.md, "Carriers"). The QUIC connection above is the same on
// every carrier; a carrier only moves whole QUIC packets, each one as:
//
//   - tls: a TLS 1.3 connection on the TCP port with ALPN "tp-carrier/1";
//     each packet is a 2-octet big-endian length followed by that many octets.
//   - ws:  a WebSocket (RFC 6455) at CarrierWSPath on a website name of the
//     port; each packet is one binary message.
//   - http: POST requests at CarrierHTTPPath; bodies both ways are packets in
//     the tls carrier's framing.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Carrier names, as `tp --carrier` and the discovery document spell them.
const (
	CarrierUDP  = "udp"
	CarrierTLS  = "tls"
	CarrierWS   = "ws"
	CarrierHTTP = "http"
)

// ALPNCarrier selects the TLS carrier on the shared TCP port.
const ALPNCarrier = "tp-carrier/1"

// CarrierWSPath is where the WebSocket carrier is served on the website side.
const CarrierWSPath = "/.well-known/tp-carrier/ws"

// CarrierHTTPPath is where the http carrier (polling) is served on the
// website side and on the proxy names.
const CarrierHTTPPath = "/.well-known/tp-carrier/http"

// CarrierSessionHeader names an http carrier session: 32 hex digits (16
// random octets) that the client chooses.
const CarrierSessionHeader = "Tp-Carrier-Session"

// MaxCarrierBody bounds an http carrier request or response body.
const MaxCarrierBody = 64 << 10

// ValidCarrierSession reports whether id is a well-formed http carrier session ID.
func ValidCarrierSession(id string) bool {
	if len(id) != 32 {
		return false
	}
	for _, c := range id {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// MaxCarrierPacket bounds one QUIC packet on a carrier. quic-go never sends
// more than 1452 octets; another implementation may send up to this many. A
// longer frame ends the carrier connection.
const MaxCarrierPacket = 1500

// ErrCarrierFrame is a carrier frame that breaks the framing rules.
var ErrCarrierFrame = errors.New("bad carrier frame")

// WriteCarrierFrame writes one packet in the tls carrier's framing. b must be
// 1..MaxCarrierPacket octets. buf, when it has room, avoids an allocation and
// lets the frame go out in one write.
func WriteCarrierFrame(w io.Writer, b []byte, buf []byte) error {
	if len(b) == 0 || len(b) > MaxCarrierPacket {
		return fmt.Errorf("%w: a packet of %d octets (1..%d allowed)", ErrCarrierFrame, len(b), MaxCarrierPacket)
	}
	if cap(buf) < 2+len(b) {
		buf = make([]byte, 2+len(b))
	}
	buf = buf[:2+len(b)]
	binary.BigEndian.PutUint16(buf, uint16(len(b)))
	copy(buf[2:], b)
	_, err := w.Write(buf)
	return err
}

// ReadCarrierFrame reads one packet of the tls carrier's framing into b (which
// must hold MaxCarrierPacket octets) and returns its length. A zero or
// oversized length is ErrCarrierFrame: the stream is no longer in step and
// must be closed.
func ReadCarrierFrame(r io.Reader, b []byte) (int, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if n == 0 || n > MaxCarrierPacket || n > len(b) {
		return 0, fmt.Errorf("%w: length %d (1..%d allowed)", ErrCarrierFrame, n, MaxCarrierPacket)
	}
	if _, err := io.ReadFull(r, b[:n]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, err
	}
	return n, nil
}

// ReadCarrierMessage reads one whole ws carrier message from r into b: an empty one, or one longer
// than b, is ErrCarrierFrame.
func ReadCarrierMessage(r io.Reader, b []byte) (int, error) {
	n, err := io.ReadFull(r, b)
	switch {
	case err == nil: // b is full: the message must end here
		var one [1]byte
		if k, _ := r.Read(one[:]); k > 0 {
			return 0, ErrCarrierFrame
		}
		if _, err := r.Read(one[:]); err != io.EOF {
			return 0, ErrCarrierFrame
		}
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
	default:
		return 0, err
	}
	if n == 0 {
		return 0, ErrCarrierFrame
	}
	return n, nil
}
