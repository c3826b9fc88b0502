package login

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// oneByteConn hands its reader one byte per read: the answer check must gather
// the first bytes of a TLS server's answer across reads.
type oneByteConn struct{ net.Conn }

func (c oneByteConn) Read(p []byte) (int, error) { return c.Conn.Read(p[:min(len(p), 1)]) }

// A real TLS server, read one byte at a time, passes the check: the handshake
// completes and data flows both ways.
func TestCheckTLSAnswerPassesTLS(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	cert := ca.ServerCert(t, "127.0.0.1")
	clientRaw, serverRaw := testnet.Pair(t)
	go func() {
		s := tls.Server(serverRaw, &tls.Config{Certificates: []tls.Certificate{cert}})
		defer s.Close()
		_, _ = io.Copy(s, s)
	}()
	c := tls.Client(CheckTLSAnswer(oneByteConn{clientRaw}), &tls.Config{RootCAs: ca.Pool, ServerName: "127.0.0.1"})
	defer c.Close()
	if err := c.HandshakeContext(t.Context()); err != nil {
		t.Fatalf("TLS handshake through the answer check: %v", err)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
		t.Fatalf("read %q, %v through the answer check; want the echo \"ping\"", got, err)
	}
}

// Bad input: an answer a TLS server does not send (a short text, our own hello
// sent back, a record of another version). None may pass as TLS; a TLS
// server's alert must.
func TestTLSAnswer(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		answer string
		tls    bool
	}{
		{"H", false},
		{"SSH-2.0-x\r\n", false},
		{"\x16\x03\x01\x00\x10\x01", false}, // a ClientHello: ours, echoed
		{"\x16\x02\x00\x00\x10\x02", false}, // SSL 2 is not TLS
		{"\x16\x03\x03\x00\x10\x02", true},  // a ServerHello
		{"\x15\x03\x03\x00\x02\x02\x28", true},
		{"\x16", true}, // too short to tell: TLS's own checks judge the rest
	} {
		if got := tlsAnswer([]byte(tc.answer)); got != tc.tls {
			t.Errorf("tlsAnswer(%q) = %v; want %v", tc.answer, got, tc.tls)
		}
	}
}

// A connection closed before any answer is told apart, and still matches io.EOF
// (the TLS client's retry of a refusal at accept depends on it).
func TestCheckTLSAnswerNoAnswer(t *testing.T) {
	t.Parallel()
	addr := testnet.Serve(t, func(*net.TCPConn) {}) // Bad input: closes each connection at once
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := tls.Client(CheckTLSAnswer(raw), &tls.Config{ServerName: "127.0.0.1"})
	defer c.Close()
	err = c.HandshakeContext(t.Context())
	// The server's close is a FIN, or a RST when the ClientHello was still
	// unread in its socket: both are a hang-up without an answer.
	var ce *ConnectError
	hungUp := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
	if !errors.As(ExplainConnect(addr, err), &ce) || !hungUp {
		t.Fatalf("handshake with a port that hangs up: %v; want a ConnectError over EOF or a connection reset", err)
	}
}

// The answer check and its description see untrusted bytes.
func FuzzNotTLSError(f *testing.F) {
	f.Add([]byte("HTTP/1.1 400 Bad Request\r\n"))
	f.Add([]byte("\x16\x03\x01\x00\x10\x01"))
	f.Add([]byte{0xff, 0, '\n'})
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) == 0 {
			return
		}
		_ = tlsAnswer(b)
		s := (&NotTLSError{Answer: b}).says()
		for _, r := range s {
			if r < ' ' || r > '~' {
				t.Fatalf("the description of %q has a control or non-ASCII character: %q", b, s)
			}
		}
	})
}
