package wire

import (
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// An http carrier session belongs to whoever opened it, not to whoever knows
// its ID, which travels in the clear on a plain-HTTP listener and is seen by
// any CDN on the way (docs/PROTOCOL.md §9.8). The opening request carries the
// client's X25519 public key (CarrierKeyHeader); the answer carries the
// server's; both derive a session key from the shared secret, and every later
// request carries a sequence number and a MAC of the session ID, that number
// and the body (CarrierAuthHeader). The server takes a sequence number once.

// CarrierKeyHeader carries an X25519 public key, 64 lower-case hex digits:
// the client's on the request that opens an http carrier session, the
// server's on its answer.
const CarrierKeyHeader = "Tp-Carrier-Key"

// CarrierAuthHeader proves a request of an http carrier session is its
// owner's: "SEQ.MAC", SEQ a decimal sequence number from 1, MAC 32 hex digits.
const CarrierAuthHeader = "Tp-Carrier-Auth"

// carrierAuthInfo separates the http carrier's keys and MACs from any other
// use of the same secrets.
const carrierAuthInfo = "tp-carrier-http/1"

// CarrierMACSize is the octets of a request's MAC (HMAC-SHA256, truncated).
const CarrierMACSize = 16

// NewCarrierKey returns a new X25519 key and its public half as the
// CarrierKeyHeader value.
func NewCarrierKey() (*ecdh.PrivateKey, string, error) {
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, "", err
	}
	return k, hex.EncodeToString(k.PublicKey().Bytes()), nil
}

// CarrierSessionKey derives an http carrier session's key from this end's
// private key, the other end's CarrierKeyHeader value and the session ID.
func CarrierSessionKey(priv *ecdh.PrivateKey, peer, id string) ([]byte, error) {
	raw, err := hex.DecodeString(peer)
	if err != nil || len(peer) != 64 || strings.ToLower(peer) != peer {
		return nil, fmt.Errorf("%s is not 64 lower-case hex digits", CarrierKeyHeader)
	}
	pub, err := ecdh.X25519().NewPublicKey(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CarrierKeyHeader, err)
	}
	shared, err := priv.ECDH(pub)
	if err != nil { // a low-order point: no shared secret
		return nil, fmt.Errorf("%s: %w", CarrierKeyHeader, err)
	}
	return hkdf.Key(sha256.New, shared, []byte(id), carrierAuthInfo, 32)
}

// carrierMAC is the MAC of one request: its session ID, sequence number and body.
func carrierMAC(key []byte, id string, seq uint64, body []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(carrierAuthInfo))
	h.Write([]byte(id))
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], seq)
	h.Write(n[:])
	sum := sha256.Sum256(body)
	h.Write(sum[:])
	return h.Sum(nil)[:CarrierMACSize]
}

// CarrierAuth is the CarrierAuthHeader value of request number seq with body.
func CarrierAuth(key []byte, id string, seq uint64, body []byte) string {
	return strconv.FormatUint(seq, 10) + "." + hex.EncodeToString(carrierMAC(key, id, seq, body))
}

// ErrCarrierAuth is a request whose CarrierAuthHeader is missing, malformed
// or wrong.
var ErrCarrierAuth = errors.New("the request does not prove it is the session's: no valid " + CarrierAuthHeader)

// CheckCarrierAuth checks a request's CarrierAuthHeader value against its
// body and returns its sequence number.
func CheckCarrierAuth(key []byte, id, value string, body []byte) (uint64, error) {
	seqText, macText, ok := strings.Cut(value, ".")
	if !ok || len(seqText) == 0 || len(seqText) > 20 || len(macText) != 2*CarrierMACSize {
		return 0, ErrCarrierAuth
	}
	seq, err := strconv.ParseUint(seqText, 10, 64)
	if err != nil || seq == 0 {
		return 0, ErrCarrierAuth
	}
	mac, err := hex.DecodeString(macText)
	if err != nil || !hmac.Equal(mac, carrierMAC(key, id, seq, body)) {
		return 0, ErrCarrierAuth
	}
	return seq, nil
}

// CarrierReplay remembers which sequence numbers of a session were taken: a
// number is taken once, and one more than CarrierReplayWindow below the
// highest taken is refused (requests in flight at once may arrive out of
// order, a few at a time). Not safe for concurrent use.
type CarrierReplay struct {
	top  uint64 // the highest taken
	seen uint64 // bit i: top-i was taken
}

// CarrierReplayWindow is how far below the highest number taken a number is
// still taken.
const CarrierReplayWindow = 64

// Take reports whether seq is new, and records it.
func (r *CarrierReplay) Take(seq uint64) bool {
	switch {
	case seq > r.top:
		shift := seq - r.top
		if shift >= CarrierReplayWindow {
			r.seen = 0
		} else {
			r.seen <<= shift
		}
		r.seen |= 1
		r.top = seq
		return true
	case r.top-seq >= CarrierReplayWindow:
		return false
	}
	bit := uint64(1) << (r.top - seq)
	if r.seen&bit != 0 {
		return false
	}
	r.seen |= bit
	return true
}
