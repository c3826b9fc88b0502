package wire

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// A browser's close of its session (CLOSE_WEBTRANSPORT_SESSION's payload)
// is read without panicking, and whatever is read is what AppendWTClose
// writes back; a message that is not UTF-8 or longer than the bound is
// refused.
func FuzzWTClose(f *testing.F) {
	f.Add([]byte{0, 0, 0, 5, 'g', 'o', 'n', 'e'})
	f.Add([]byte{0, 0, 0})
	f.Add(append([]byte{0, 0, 0, 0}, strings.Repeat("x", WTMaxCloseMessage+1)...))
	f.Add([]byte{0, 0, 0, 1, 0xff, 0xfe})
	f.Fuzz(func(t *testing.T, p []byte) {
		code, msg, err := WTClose(p)
		if err != nil {
			return
		}
		if !utf8.ValidString(msg) || len(msg) > WTMaxCloseMessage {
			t.Fatalf("WTClose took %q", msg)
		}
		c, err := ReadIPCapsule(bufio.NewReader(bytes.NewReader(AppendWTClose(nil, code, msg))))
		if err != nil || c.Type != WTCloseSessionCapsule {
			t.Fatalf("the close written back: %+v, %v", c, err)
		}
		if code2, msg2, err := WTClose(c.Payload); err != nil || code2 != code || msg2 != msg {
			t.Fatalf("round trip: %d %q %v, want %d %q", code2, msg2, err, code, msg)
		}
	})
}

// A session's proof, any bytes, is refused unless it is the key's signature
// of the message, in r||s or DER; it never panics, and a proof it takes
// names the r it was made with.
func FuzzWebTransportProof(f *testing.F) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fuzz"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		f.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		f.Fatal(err)
	}
	msg := WebTransportProofMessage("tp.example.org", "1700000000", der)
	sum := sha256.Sum256(msg)
	good, err := ecdsa.SignASN1(rand.Reader, k, sum[:])
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(make([]byte, 64))
	f.Add([]byte{0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01})
	f.Fuzz(func(t *testing.T, proof []byte) {
		r, err := CheckWebTransportProof(leaf, msg, proof)
		if err != nil {
			return
		}
		if r == nil || r.Sign() <= 0 {
			t.Fatalf("a proof taken names r = %v", r)
		}
	})
}
