package wire

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"math/big"
	"net"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/quic-go/quic-go"
)

// WebTransport (docs/PROTOCOL.md, section 14): a browser, which cannot
// present a device certificate to a WebTransport server, opens a session on
// the website's HTTP/3 at WebTransportPath with its certificate and a proof
// that it holds the certificate's key in the query; each bidirectional
// stream of the session then carries one request exactly as a stream of a
// "tp/1" QUIC connection does (hellos, bytes, aborts).
const (
	// WebTransportPath is where a session is opened (extended CONNECT,
	// :protocol webtransport), on any of the website's names.
	WebTransportPath = "/tp/v1/webtransport"
	// The query parameters: the certificate chain (leaf first, base64url
	// DER, the parameter repeated for each), the time of the proof (Unix
	// seconds) and the proof (base64url).
	WebTransportCert  = "cert"
	WebTransportTime  = "time"
	WebTransportProof = "proof"
	// WebTransportProofWindow is how far the proof's time may lie from the
	// server's clock, either way; the server refuses a proof it saw before
	// within the window.
	WebTransportProofWindow = 2 * time.Minute
	// WebTransportMaxCerts and WebTransportMaxCertBytes bound the chain a
	// session may present.
	WebTransportMaxCerts     = 4
	WebTransportMaxCertBytes = 8 << 10
)

// Session close codes (CLOSE_WEBTRANSPORT_SESSION): QUICNoError,
// QUICShutdown, QUICCertExpired, QUICRevoked carry their meaning from the
// QUIC mapping; WTRefused says the server refused the session and its
// message is a server hello that says why (docs/PROTOCOL.md, 14.2).
const WTRefused = 0x10

// WebTransportProofMessage is what the certificate's key signs to open a
// session: a context, the request's authority (host[:port], lower case, as
// the browser sends it), the time as decimal Unix seconds, and the SHA-256
// of the leaf certificate's DER.
func WebTransportProofMessage(authority, unix string, leafDER []byte) []byte {
	sum := sha256.Sum256(leafDER)
	m := make([]byte, 0, 64+len(authority)+len(unix))
	m = append(m, "tp webtransport v1\x00"...)
	m = append(m, authority...)
	m = append(m, 0)
	m = append(m, unix...)
	m = append(m, 0)
	return append(m, sum[:]...)
}

// CheckWebTransportProof verifies proof, a signature by leaf's key over msg:
// ECDSA over P-256 with SHA-256 or over P-384 with SHA-384, as r||s of the
// curve's size (WebCrypto's form) or as ASN.1 DER. It returns the
// signature's r, which names the proof whatever its encoding (a signature
// has two of them and two s for each r: a replay check must not count them
// apart).
func CheckWebTransportProof(leaf *x509.Certificate, msg, proof []byte) (*big.Int, error) {
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, errors.New("the certificate's key is not an ECDSA key; a browser's credential holds a P-256 key")
	}
	var digest []byte
	switch pub.Curve {
	case elliptic.P256():
		h := sha256.Sum256(msg)
		digest = h[:]
	case elliptic.P384():
		h := sha512.Sum384(msg)
		digest = h[:]
	default:
		return nil, errors.New("the certificate's key is on a curve TP does not take (P-256 or P-384)")
	}
	size := (pub.Curve.Params().BitSize + 7) / 8
	var r, s *big.Int
	if len(proof) == 2*size {
		r, s = new(big.Int).SetBytes(proof[:size]), new(big.Int).SetBytes(proof[size:])
	} else {
		var sig struct{ R, S *big.Int }
		if rest, err := asn1.Unmarshal(proof, &sig); err != nil || len(rest) != 0 || sig.R == nil || sig.S == nil {
			return nil, errors.New("the proof is neither r||s nor an ASN.1 ECDSA signature")
		}
		r, s = sig.R, sig.S
	}
	if !ecdsa.Verify(pub, digest, r, s) {
		return nil, errors.New("the proof is not the certificate key's signature of this session's request")
	}
	return r, nil
}

// WebTransportTimeOK says whether unix, a proof's time, lies within
// WebTransportProofWindow of now, and the time it names.
func WebTransportTimeOK(unix string, now time.Time) (time.Time, bool) {
	n, err := strconv.ParseInt(unix, 10, 64)
	if err != nil || len(unix) > 12 {
		return time.Time{}, false
	}
	t := time.Unix(n, 0)
	d := now.Sub(t)
	return t, d <= WebTransportProofWindow && d >= -WebTransportProofWindow
}

// WebTransport over HTTP/3 (draft-ietf-webtrans-http3), the parts TP uses.
const (
	// WTStreamType begins a bidirectional stream of a session: the type,
	// then the session ID (the CONNECT request's stream ID), as varints.
	WTStreamType = 0x41
	// WTUniStreamType begins a unidirectional stream of a session.
	WTUniStreamType = 0x54
	// Capsules on the CONNECT stream.
	WTCloseSessionCapsule = 0x2843
	WTDrainSessionCapsule = 0x78ae
	// SETTINGS a WebTransport server sends (beside SETTINGS_H3_DATAGRAM and
	// SETTINGS_ENABLE_CONNECT_PROTOCOL): WebTransport enabled, as drafts up
	// to 06 and later ones name it, and at most one session per connection
	// (no WebTransport flow control).
	WTSettingEnableDraft06 = 0x2b603742
	WTSettingEnabled       = 0x2c7cf000
	WTSettingMaxSessions   = 0x14e9cd29
	// WTBufferedStreamRejected resets a stream whose session did not come
	// (WT_BUFFERED_STREAM_REJECTED); WTSessionGone one whose session ended.
	WTBufferedStreamRejected quic.StreamErrorCode = 0x3994bd84
	WTSessionGone            quic.StreamErrorCode = 0x170d7b68
	// WTMaxCloseMessage bounds a CLOSE_WEBTRANSPORT_SESSION's message.
	WTMaxCloseMessage = 1024
)

// The application error codes of WebTransport streams (32 bits) are carried
// in HTTP/3's space from wtFirstCode, skipping HTTP/3's reserved codes.
const (
	wtFirstCode = 0x52e4a40fa8db
	wtLastCode  = 0x52e5ac983162
)

// WTCode is TP's code as a WebTransport stream's reset carries it.
func WTCode(code quic.ApplicationErrorCode) quic.StreamErrorCode {
	n := uint64(uint32(code))
	return quic.StreamErrorCode(wtFirstCode + n + n/0x1e)
}

// WTCodeOf is the WebTransport application code a reset carried, false when
// it is not one.
func WTCodeOf(h quic.StreamErrorCode) (quic.ApplicationErrorCode, bool) {
	if h < wtFirstCode || h > wtLastCode || (h-0x21)%0x1f == 0 {
		return 0, false
	}
	shifted := uint64(h - wtFirstCode)
	return quic.ApplicationErrorCode(shifted - shifted/0x1f), true
}

// AppendWTClose appends a CLOSE_WEBTRANSPORT_SESSION capsule: a 32-bit code
// and a message of at most WTMaxCloseMessage bytes (cut at a rune).
func AppendWTClose(b []byte, code uint32, msg string) []byte {
	if len(msg) > WTMaxCloseMessage {
		cut := WTMaxCloseMessage
		for cut > 0 && !utf8.RuneStart(msg[cut]) {
			cut--
		}
		msg = msg[:cut]
	}
	p := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(msg)), code)
	return AppendIPCapsule(b, WTCloseSessionCapsule, append(p, msg...))
}

// WTClose reads a CLOSE_WEBTRANSPORT_SESSION capsule's payload.
func WTClose(p []byte) (code uint32, msg string, err error) {
	if len(p) < 4 || len(p) > 4+WTMaxCloseMessage || !utf8.Valid(p[4:]) {
		return 0, "", errors.New("a CLOSE_WEBTRANSPORT_SESSION capsule of a bad size or with a message that is not UTF-8")
	}
	return binary.BigEndian.Uint32(p), string(p[4:]), nil
}

// WTStream adapts a bidirectional stream of a WebTransport session (its
// header read) to Stream, as QUICStream does a QUIC stream, with TP's codes
// carried in WebTransport's space. It is not a QUICStreamer: a UDP flow on it
// sends its datagrams as the session's datagrams (HTTP Datagrams of the
// CONNECT stream), never as bare QUIC DATAGRAM frames of the HTTP/3
// connection (PROTOCOL.md 14.2).
type WTStream struct {
	q             QUICStream
	sessionClosed <-chan struct{}
	dg            *SessionDatagrams
}

var _ Stream = (*WTStream)(nil)

// wtSessionCloseWait bounds how long an abort that ends the whole session
// waits for the session's close to be sent.
const wtSessionCloseWait = time.Second

// NewWTStream wraps str, a stream of a session on conn. sessionClosed, when
// not nil, is closed once the session's close was sent: an abort with a
// code that ends the session (revoked, cert_expired, shutdown) waits for it
// (at most a second), so that the browser reads why the session ended
// before its streams are reset.
// dg, when not nil, is the session's datagrams: a UDP flow on the stream
// sends its datagrams there, with the stream's flow id (its ID / 4), and
// capsules only for those too large.
func NewWTStream(conn *quic.Conn, str *quic.Stream, sessionClosed <-chan struct{}, dg *SessionDatagrams) *WTStream {
	return &WTStream{q: QUICStream{conn: conn, str: str, wt: true}, sessionClosed: sessionClosed, dg: dg}
}

// SessionDatagrams is the session's datagrams and this stream's flow id.
func (s *WTStream) SessionDatagrams() (*SessionDatagrams, uint64) {
	return s.dg, uint64(s.q.str.StreamID()) / 4
}

// Context ends when the browser stops the stream or the connection ends.
func (s *WTStream) Context() context.Context { return s.q.Context() }

func (s *WTStream) Read(p []byte) (int, error)  { return s.q.Read(p) }
func (s *WTStream) Write(p []byte) (int, error) { return s.q.Write(p) }

// CloseWrite sends FIN.
func (s *WTStream) CloseWrite() error { return s.q.CloseWrite() }

// Close stops receiving and sends FIN after what was written.
func (s *WTStream) Close() error {
	s.q.str.CancelRead(WTCode(QUICNoError))
	if err := s.q.str.Close(); err != nil {
		s.q.str.CancelWrite(WTCode(QUICNoError))
	}
	return nil
}

// Abort resets both directions with code.
func (s *WTStream) Abort(code quic.ApplicationErrorCode) {
	if s.sessionClosed != nil && (code == QUICRevoked || code == QUICCertExpired || code == QUICShutdown) {
		t := time.NewTimer(wtSessionCloseWait)
		select {
		case <-s.sessionClosed:
		case <-t.C:
		}
		t.Stop()
	}
	s.q.str.CancelRead(WTCode(code))
	s.q.str.CancelWrite(WTCode(code))
}

func (s *WTStream) LocalAddr() net.Addr                { return s.q.LocalAddr() }
func (s *WTStream) RemoteAddr() net.Addr               { return s.q.RemoteAddr() }
func (s *WTStream) SetDeadline(t time.Time) error      { return s.q.SetDeadline(t) }
func (s *WTStream) SetReadDeadline(t time.Time) error  { return s.q.SetReadDeadline(t) }
func (s *WTStream) SetWriteDeadline(t time.Time) error { return s.q.SetWriteDeadline(t) }
