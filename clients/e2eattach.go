package clients

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Attached end-to-end sessions (docs/PROTOCOL.md, section 11.4, ALPN tp-e2e/2).
//
// A full end-to-end TLS 1.3 session (X25519MLKEM768 key exchange, certificates
// both ways) costs two round trips between dialer and agent through the relay
// and about half a millisecond of CPU. After one such session negotiated
// tp-e2e/2, both ends keep an attach secret exported from it; a later session
// of the same dialer to the same name still goes through the relay as a dial of
// its own (policy, log, its own stream), but instead of a new TLS handshake it
// sends a 45-byte attach: the state's id, a session number never used before,
// and a record sealed with the session's key, which proves the dialer holds the
// secret. The agent answers with its hello in the first sealed record, after
// the same per-session checks as after a handshake. The session's bytes are then
// sealed with keys derived from the secret and the session number (AES-256-GCM,
// a sequence number per direction): no key exchange, no signature, one round
// trip less, and the keys still come from the post-quantum exchange of the full
// session.

// E2EALPN2 is the ALPN of an end-to-end TLS session after which both ends keep
// attach state.
const E2EALPN2 = "tp-e2e/2"

// E2EALPN3 is E2EALPN2 whose attaches may carry the dialer's first bytes in the
// proof record (attach version 2): the agent passes them to its service right
// after its checks, so a client that speaks first gets its answer one round
// trip through the relay sooner.
const E2EALPN3 = "tp-e2e/3"

const (
	attachMarker   = 0x00 // first byte of an attach: a TLS record never starts with content type 0
	attachVersion  = 0x01
	attachVersion2 = 0x02 // tp-e2e/3: the proof record may carry data
	attachAccepted = 0x01 // agent: sealed records follow
	attachFallback = 0x02 // agent: unknown, expired or replayed; a TLS ClientHello is expected next
	attachIDLen    = 16
	attachHeadLen  = 2 + attachIDLen + 8        // marker, version, id, session number
	attachMsgLen   = attachHeadLen + 2 + 1 + 16 // … and the sealed proof record
	attachSecret   = "EXPORTER-tp-e2e-attach-secret"
	attachIDLabel  = "EXPORTER-tp-e2e-attach-id"

	// AttachLife bounds how long attach state is used after the full session it
	// came from (then a new full session renews the keys); attachIdle drops state
	// unused for that long. Both ends also stop at the end of either certificate.
	AttachLife = time.Hour
	attachIdle = 10 * time.Minute
	// maxAttachStates bounds an agent's attach state (the least recently used is
	// dropped); attachWindow is how far behind the highest session number a
	// reordered attach may arrive.
	maxAttachStates = 1024
	attachWindow    = 1024

	sealedMaxPlain = 16384
	sealedOverhead = 1 + 16 // record type, GCM tag
	// sealedSendPlain is the data TP puts in one record: length, data, type and
	// tag then make 16384 bytes, one full record of the outer TLS connection.
	sealedSendPlain = 16384 - 2 - sealedOverhead
	recData         = 0x17
	recClose        = 0x15 // end of this direction, like TLS close_notify
	recProof        = 0x16 // the dialer's first record of an attach (data only in version 2)

	// maxAttachFirst bounds the first bytes an attach carries: with the attach
	// they stay within the early data a server discards on a refusal
	// (wire.MaxEarlyData, docs/PROTOCOL.md section 6.5).
	maxAttachFirst = wire.MaxEarlyData - attachHeadLen - 2 - sealedOverhead
)

// attachKeys derives the keys of session n: dialer → agent, agent → dialer.
func attachKeys(secret []byte, id [attachIDLen]byte, n uint64) (c2s, s2c cipher.AEAD, err error) {
	salt := binary.BigEndian.AppendUint64(id[:len(id):len(id)], n)
	prk, err := hkdf.Extract(sha256.New, secret, salt)
	if err != nil {
		return nil, nil, err
	}
	mk := func(label string) (cipher.AEAD, error) {
		k, err := hkdf.Expand(sha256.New, prk, label, 32)
		if err != nil {
			return nil, err
		}
		b, err := aes.NewCipher(k)
		if err != nil {
			return nil, err
		}
		return cipher.NewGCM(b)
	}
	if c2s, err = mk("tp-e2e/2 dialer to agent"); err != nil {
		return nil, nil, err
	}
	s2c, err = mk("tp-e2e/2 agent to dialer")
	return c2s, s2c, err
}

// exportAttach exports the attach secret and id of a tp-e2e/2 session.
func exportAttach(cs tls.ConnectionState) (secret []byte, id [attachIDLen]byte, err error) {
	if secret, err = cs.ExportKeyingMaterial(attachSecret, nil, 32); err != nil {
		return nil, id, err
	}
	b, err := cs.ExportKeyingMaterial(attachIDLabel, nil, attachIDLen)
	copy(id[:], b)
	return secret, id, err
}

// dialerAttach is a dialer's attach state for one reverse name.
type dialerAttach struct {
	id      [attachIDLen]byte
	secret  []byte
	first   bool      // made by a tp-e2e/3 session: attaches may carry first bytes
	expires time.Time // AttachLife, and both certificates' ends
	mu      sync.Mutex
	next    uint64    // the next session number
	used    time.Time // last attach
}

// pendingAttach is one session's attach, before the agent answered it.
type pendingAttach struct {
	st       *dialerAttach
	msg      []byte // the attach message
	c2s, s2c cipher.AEAD
	sent     bool       // msg went with the hello
	early    *earlyDial // the dial whose first bytes msg carries, or nil
}

// message is the attach to send with the hello (nil for none).
func (p *pendingAttach) message() []byte {
	if p == nil {
		return nil
	}
	p.sent = true
	return p.msg
}

// prepare takes a session number and makes its keys and attach, or returns nil
// when the state is too old to use. The attach carries early's first bytes when
// the state allows it (tp-e2e/3) and they fit.
func (s *dialerAttach) prepare(now time.Time, early *earlyDial) *pendingAttach {
	n, ok := s.take(now)
	if !ok {
		return nil
	}
	c2s, s2c, err := attachKeys(s.secret, s.id, n)
	if err != nil {
		return nil
	}
	if !s.first || early == nil || len(early.first) == 0 || len(early.first) > maxAttachFirst || early.sent {
		return &pendingAttach{st: s, msg: attachMessage(s.id, n, c2s, attachVersion, nil), c2s: c2s, s2c: s2c}
	}
	early.sealed = true
	return &pendingAttach{st: s, msg: attachMessage(s.id, n, c2s, attachVersion2, early.first), c2s: c2s, s2c: s2c, early: early}
}

// take returns a session number, or false when the state is too old to use.
func (s *dialerAttach) take(now time.Time) (uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !now.Before(s.expires) || now.Sub(s.used) >= attachIdle {
		return 0, false
	}
	s.used = now
	s.next++
	return s.next, true
}

// attachStates is a Dialer's attach state, by full reverse name.
type attachStates struct {
	mu sync.Mutex
	m  map[string]*dialerAttach
	// Attached counts sessions that attached instead of a TLS handshake (tests).
	attached, full int
}

func (a *attachStates) get(host string) *dialerAttach {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.m[strings.ToLower(host)]
}

func (a *attachStates) put(host string, s *dialerAttach) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m == nil {
		a.m = map[string]*dialerAttach{}
	}
	if len(a.m) >= maxAttachStates {
		for k := range a.m { // any one: a dialer rarely reaches this many names
			delete(a.m, k)
			break
		}
	}
	a.m[strings.ToLower(host)] = s
}

// drop forgets s for host (when it is still the state held).
func (a *attachStates) drop(host string, s *dialerAttach) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m[strings.ToLower(host)] == s {
		delete(a.m, strings.ToLower(host))
	}
}

func (a *attachStates) count(attached bool) {
	a.mu.Lock()
	if attached {
		a.attached++
	} else {
		a.full++
	}
	a.mu.Unlock()
}

// E2EStats says how many end-to-end sessions this Dialer opened with a full TLS
// handshake and how many attached to kept state instead.
func (d *Dialer) E2EStats() (full, attached int) {
	d.e2e.mu.Lock()
	defer d.e2e.mu.Unlock()
	return d.e2e.full, d.e2e.attached
}

// newDialerAttach keeps the attach state of an end-to-end session that
// negotiated tp-e2e/2.
func newDialerAttach(cs tls.ConnectionState, now time.Time) (*dialerAttach, error) {
	secret, id, err := exportAttach(cs)
	if err != nil {
		return nil, err
	}
	exp := now.Add(AttachLife)
	for _, c := range cs.PeerCertificates[:1] {
		exp = minTime(exp, c.NotAfter)
	}
	return &dialerAttach{id: id, secret: secret, first: cs.NegotiatedProtocol == E2EALPN3, expires: exp, used: now}, nil
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// attachMessage is the dialer's attach: marker, version, id, n, sealed proof
// (carrying first, version 2 only).
func attachMessage(id [attachIDLen]byte, n uint64, c2s cipher.AEAD, version byte, first []byte) []byte {
	msg := make([]byte, 0, attachMsgLen+len(first))
	msg = append(msg, attachMarker, version)
	msg = append(msg, id[:]...)
	msg = binary.BigEndian.AppendUint64(msg, n)
	return appendRecord(msg, c2s, 0, recProof, first)
}

// appendRecord seals one record (length, then AES-GCM of data and type, the
// length as additional data) with sequence number seq, in place in dst.
func appendRecord(dst []byte, aead cipher.AEAD, seq uint64, typ byte, data []byte) []byte {
	var nonce [12]byte
	binary.BigEndian.PutUint64(nonce[4:], seq)
	var hdr [2]byte
	binary.BigEndian.PutUint16(hdr[:], uint16(len(data)+sealedOverhead))
	dst = slices.Grow(dst, 2+len(data)+sealedOverhead)
	dst = append(dst, hdr[:]...)
	start := len(dst)
	dst = append(append(dst, data...), typ)
	sealed := aead.Seal(dst[start:start], nonce[:], dst[start:], hdr[:])
	return dst[:start+len(sealed)]
}

// openRecord opens one record body (without its length) sealed with seq.
func openRecord(aead cipher.AEAD, seq uint64, hdr, body []byte) (typ byte, data []byte, err error) {
	var nonce [12]byte
	binary.BigEndian.PutUint64(nonce[4:], seq)
	plain, err := aead.Open(body[:0], nonce[:], body, hdr)
	if err != nil || len(plain) == 0 {
		return 0, nil, &wire.ProtocolError{Err: errors.New("an end-to-end record does not open with the session's key (forged, replayed or reordered)")}
	}
	return plain[len(plain)-1], plain[:len(plain)-1], nil
}

// sealedConn carries a session's bytes in sealed records over the relay's
// stream. A close record ends a direction (CloseWrite); an end of the stream
// without one is a cut (wire.ErrTruncated), never a clean end.
type sealedConn struct {
	net.Conn // the relay's stream

	rmu     sync.Mutex
	raead   cipher.AEAD
	rseq    uint64
	pending []byte
	rbuf    []byte
	rerr    error

	wmu    sync.Mutex
	waead  cipher.AEAD
	wseq   uint64
	wbuf   []byte
	werr   error
	closed bool // a close record was sent
}

var _ wire.Stream = (*sealedConn)(nil)

// newSealedConn: rseq/wseq are the first sequence numbers of each direction.
func newSealedConn(c net.Conn, r, w cipher.AEAD, rseq, wseq uint64) *sealedConn {
	return &sealedConn{Conn: c, raead: r, waead: w, rseq: rseq, wseq: wseq}
}

// Unwrap is the relay's stream.
func (s *sealedConn) Unwrap() net.Conn { return s.Conn }

func (s *sealedConn) Read(p []byte) (int, error) {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	for len(s.pending) == 0 {
		if s.rerr != nil {
			return 0, s.rerr
		}
		typ, data, err := s.readRecord()
		if err != nil {
			var ne net.Error
			if !(errors.As(err, &ne) && ne.Timeout()) { // a deadline leaves the session usable
				s.rerr = err
			}
			return 0, err
		}
		switch typ {
		case recData:
			s.pending = data
		case recClose:
			s.rerr = io.EOF
		default:
			s.rerr = &wire.ProtocolError{Err: fmt.Errorf("unexpected end-to-end record type 0x%02x", typ)}
		}
	}
	n := copy(p, s.pending)
	s.pending = s.pending[n:]
	return n, nil
}

func (s *sealedConn) readRecord() (byte, []byte, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(s.Conn, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, fmt.Errorf("end-to-end session: %w", wire.ErrTruncated)
		}
		return 0, nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if n < sealedOverhead || n > sealedMaxPlain+sealedOverhead {
		return 0, nil, &wire.ProtocolError{Err: fmt.Errorf("end-to-end record of %d bytes", n)}
	}
	if cap(s.rbuf) < n {
		s.rbuf = make([]byte, sealedMaxPlain+sealedOverhead)
	}
	body := s.rbuf[:n]
	if _, err := io.ReadFull(s.Conn, body); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, fmt.Errorf("end-to-end session: %w", wire.ErrTruncated)
		}
		return 0, nil, err
	}
	typ, data, err := openRecord(s.raead, s.rseq, hdr[:], body)
	s.rseq++
	return typ, data, err
}

func (s *sealedConn) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.werr != nil {
		return 0, s.werr
	}
	if s.closed {
		return 0, errors.New("end-to-end session: write after CloseWrite")
	}
	// One Write of the stream per call (up to four records), as transport.BatchConn does
	// for the inner TLS session.
	written := 0
	for written < len(p) {
		s.wbuf = s.wbuf[:0]
		chunk := p[written:]
		for len(chunk) > 0 && len(s.wbuf) < 4*16384 {
			m := min(len(chunk), sealedSendPlain)
			s.wbuf = appendRecord(s.wbuf, s.waead, s.wseq, recData, chunk[:m])
			s.wseq++
			chunk = chunk[m:]
		}
		if _, err := s.Conn.Write(s.wbuf); err != nil {
			s.werr = err
			return written, err
		}
		written = len(p) - len(chunk)
	}
	return written, nil
}

// CloseWrite sends the close record and half-closes the stream.
func (s *sealedConn) CloseWrite() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closed || s.werr != nil {
		return s.werr
	}
	s.closed = true
	if _, err := s.Conn.Write(appendRecord(nil, s.waead, s.wseq, recClose, nil)); err != nil {
		s.werr = err
		return err
	}
	s.wseq++
	if cw, ok := s.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// agentAttach is an agent's attach state: whom the full session authenticated,
// for which name, until when, and which session numbers were used.
type agentAttach struct {
	secret  []byte
	full    string // the full name of the session it came from
	device  string // the dialer's TP identity (user@device), from its certificate
	user    string
	expires time.Time

	mu      sync.Mutex
	used    time.Time
	highest uint64
	seen    [attachWindow / 64]uint64 // bit i: highest-i was used
}

// claim marks n used; false when it was used before or is too old to tell.
func (s *agentAttach) claim(n uint64, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !now.Before(s.expires) || now.Sub(s.used) >= attachIdle {
		return false
	}
	switch {
	case n > s.highest:
		shift := n - s.highest
		if shift >= attachWindow {
			s.seen = [attachWindow / 64]uint64{}
		} else {
			shiftBits(&s.seen, int(shift))
		}
		s.highest = n
		s.seen[0] |= 1
	case s.highest-n >= attachWindow:
		return false
	default:
		i := s.highest - n
		if s.seen[i/64]&(1<<(i%64)) != 0 {
			return false
		}
		s.seen[i/64] |= 1 << (i % 64)
	}
	s.used = now
	return true
}

// shiftBits moves every bit of w up by k (bit i becomes bit i+k).
func shiftBits(w *[attachWindow / 64]uint64, k int) {
	words, bits := k/64, uint(k%64)
	for i := len(w) - 1; i >= 0; i-- {
		var v uint64
		if j := i - words; j >= 0 {
			v = w[j] << bits
			if bits > 0 && j-1 >= 0 {
				v |= w[j-1] >> (64 - bits)
			}
		}
		w[i] = v
	}
}

// agentAttaches is an agent's attach state, by id.
type agentAttaches struct {
	mu sync.Mutex
	m  map[[attachIDLen]byte]*agentAttach
}

func (a *agentAttaches) get(id [attachIDLen]byte) *agentAttach {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.m[id]
}

func (a *agentAttaches) put(id [attachIDLen]byte, s *agentAttach, now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m == nil {
		a.m = map[[attachIDLen]byte]*agentAttach{}
	}
	if len(a.m) >= maxAttachStates {
		var oldest [attachIDLen]byte
		var at time.Time
		for k, v := range a.m {
			v.mu.Lock()
			u, dead := v.used, !now.Before(v.expires) || now.Sub(v.used) >= attachIdle
			v.mu.Unlock()
			if dead {
				delete(a.m, k)
				continue
			}
			if at.IsZero() || u.Before(at) {
				oldest, at = k, u
			}
		}
		if len(a.m) >= maxAttachStates {
			delete(a.m, oldest)
		}
	}
	a.m[id] = s
}
