package proxy

import (
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/quic-go/quic-go"
)

// QUICLB makes the server's QUIC connection IDs carry its server ID in the
// plaintext layout of QUIC-LB (draft-ietf-quic-load-balancers, section
// "Plaintext CID Algorithm"), so that a load balancer can route a client's
// packets to this instance after the client's address changed (a NAT
// rebinding or a move to another network), when a 5-tuple hash would send them
// to another instance that does not know the connection. A connection ID is
//
//	first octet: config rotation (3 bits) | length of the rest (5 bits, self-describing)
//	server ID:   ServerID, as configured
//	nonce:       NonceLen random octets
//
// and so has the fixed length 1+len(ServerID)+NonceLen. The load balancer is
// configured with the same config rotation and server ID length and maps each
// server ID to its instance. The client's first Initial carries a connection ID
// the client chose: the load balancer routes it by its 5-tuple (any instance
// will do), and every later packet carries one of the server's.
type QUICLB struct {
	// ConfigID is the config rotation codepoint, 0 to 6 (7 marks a connection
	// ID no load balancer can route, and is refused).
	ConfigID uint8
	// ServerID is the instance's server ID, 1 to 15 octets, unique among the
	// instances behind one load balancer.
	ServerID []byte
	// NonceLen is the number of random octets after the server ID, at least 4
	// (the draft's minimum); 0 means 8. The whole ID is at most 20 octets.
	NonceLen int
}

// quicLBDefaultNonce is QUICLB.NonceLen when not set: 64 random bits make a
// collision among one instance's live connection IDs vanishingly rare.
const quicLBDefaultNonce = 8

func (c QUICLB) withDefaults() (QUICLB, error) {
	if c.NonceLen == 0 {
		c.NonceLen = quicLBDefaultNonce
	}
	var errs []error
	if c.ConfigID > 6 {
		errs = append(errs, fmt.Errorf("QUIC-LB config rotation %d must be between 0 and 6 (7 marks unroutable connection IDs)", c.ConfigID))
	}
	if len(c.ServerID) < 1 || len(c.ServerID) > 15 {
		errs = append(errs, fmt.Errorf("QUIC-LB server ID has %d octets, not 1 to 15", len(c.ServerID)))
	}
	if c.NonceLen < 4 {
		errs = append(errs, fmt.Errorf("QUIC-LB nonce length %d is below 4", c.NonceLen))
	}
	if n := 1 + len(c.ServerID) + c.NonceLen; n > 20 {
		errs = append(errs, fmt.Errorf("QUIC-LB connection IDs would have %d octets, more than QUIC's 20", n))
	}
	return c, errors.Join(errs...)
}

// Len is the length of the connection IDs, first octet included.
func (c QUICLB) Len() int {
	n := c.NonceLen
	if n == 0 {
		n = quicLBDefaultNonce
	}
	return 1 + len(c.ServerID) + n
}

// Generator is the quic.ConnectionIDGenerator of c, or what is wrong with c.
func (c QUICLB) Generator() (quic.ConnectionIDGenerator, error) {
	c, err := c.withDefaults()
	if err != nil {
		return nil, err
	}
	return quicLBGenerator{c}, nil
}

// quicLBGenerator is a quic.ConnectionIDGenerator for a QUICLB.
type quicLBGenerator struct{ cfg QUICLB }

var _ quic.ConnectionIDGenerator = quicLBGenerator{}

func (g quicLBGenerator) GenerateConnectionID() (quic.ConnectionID, error) {
	b := make([]byte, g.cfg.Len())
	b[0] = g.cfg.ConfigID<<5 | byte(len(b)-1)
	n := copy(b[1:], g.cfg.ServerID)
	if _, err := rand.Read(b[1+n:]); err != nil {
		return quic.ConnectionID{}, err
	}
	return quic.ConnectionIDFromBytes(b), nil
}

func (g quicLBGenerator) ConnectionIDLen() int { return g.cfg.Len() }

// DecodeQUICLB reads a plaintext QUIC-LB connection ID, as a load balancer
// does: its config rotation and the serverIDLen octets of server ID. ok is
// false when the ID is too short for that, says another length than it has, or
// is marked unroutable (config rotation 7).
func DecodeQUICLB(cid []byte, serverIDLen int) (configID uint8, serverID []byte, ok bool) {
	if len(cid) < 1+serverIDLen || serverIDLen < 1 {
		return 0, nil, false
	}
	configID = cid[0] >> 5
	if configID == 7 || int(cid[0]&0x1f) != len(cid)-1 {
		return configID, nil, false
	}
	return configID, cid[1 : 1+serverIDLen], true
}
