package wire

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// UDP flows (op "dial", net "udp"; docs/PROTOCOL.md section 12). After the ok the
// request's stream carries capsules; over QUIC with datagram support, datagrams
// also travel in QUIC DATAGRAM frames tagged with the flow id.

// MaxDatagramSize is the largest UDP payload a flow carries: what a capsule's
// 16-bit length can describe. A destination reached over IPv4 takes at most
// 65507 bytes; larger datagrams are dropped there and reported to the sender.
const MaxDatagramSize = 65535

// CodeTooManyFlows refuses a UDP flow beyond the bound per connection or per identity.
const CodeTooManyFlows = "too_many_flows"

// Capsule types on a UDP flow's stream.
const (
	// CapsuleDatagram carries one UDP payload (0 to MaxDatagramSize bytes).
	CapsuleDatagram byte = 0x00
	// CapsuleReport carries a JSON UDPReport: datagrams the sender dropped.
	CapsuleReport byte = 0x01
)

// capsuleHeader is type (1 byte) and length (2 bytes, big-endian).
const capsuleHeader = 3

// UDPReport tells the other end of a flow that its datagrams were dropped. The
// counts are cumulative over the flow, so a lost or late report loses nothing.
type UDPReport struct {
	V int `json:"v"`
	// TooLarge counts datagrams too large for the path they were to take
	// (EMSGSIZE at the destination, or larger than MaxDatagramSize).
	TooLarge int64 `json:"too_large,omitempty"`
	// QueueFull counts datagrams dropped because the flow's queue was full (the
	// sender sent faster than the destination path took them).
	QueueFull int64 `json:"queue_full,omitempty"`
	// Largest is the size of the largest datagram dropped as too large.
	Largest int `json:"largest,omitempty"`
}

// WriteCapsule writes one capsule in a single Write, so concurrent writers that
// hold the flow's write lock never interleave.
func WriteCapsule(w io.Writer, typ byte, p []byte) error {
	if len(p) > MaxDatagramSize {
		return fmt.Errorf("capsule of %d bytes exceeds %d", len(p), MaxDatagramSize)
	}
	buf := make([]byte, capsuleHeader+len(p))
	buf[0] = typ
	binary.BigEndian.PutUint16(buf[1:], uint16(len(p)))
	copy(buf[capsuleHeader:], p)
	_, err := w.Write(buf)
	return err
}

// ReadCapsule reads one capsule; its payload is a new slice of exactly its
// length. An end of stream between capsules is io.EOF; inside one,
// io.ErrUnexpectedEOF.
func ReadCapsule(r *bufio.Reader) (typ byte, payload []byte, err error) {
	var hdr [capsuleHeader]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	payload = make([]byte, binary.BigEndian.Uint16(hdr[1:]))
	if _, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return hdr[0], payload, nil
}

// ErrReportVersion is a REPORT whose "v" is not Version: its receiver ignores it
// (docs/PROTOCOL.md, section 2.3) and the flow goes on.
var ErrReportVersion = errors.New("UDP report of another protocol version")

// DecodeReport parses the payload of a REPORT capsule. A report that is not
// JSON of the right shape is an error; one of another version is
// ErrReportVersion, for the receiver to ignore.
func DecodeReport(p []byte) (UDPReport, error) {
	var r UDPReport
	if err := json.Unmarshal(p, &r); err != nil {
		return UDPReport{}, fmt.Errorf("malformed UDP report: %w", err)
	}
	if r.V != Version {
		return UDPReport{}, fmt.Errorf("%w: version %d, this side speaks %d", ErrReportVersion, r.V, Version)
	}
	return r, nil
}
