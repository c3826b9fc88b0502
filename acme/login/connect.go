package login

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
)

// ConnectError is a failure to reach the TP server, said in one sentence for a
// person: what happened at the address and what to check. The error from the
// network or TLS stays reachable through Unwrap.
type ConnectError struct {
	Addr   string // the server's HOST:PORT
	Reason string // a sentence that names Addr
	Err    error
}

func (e *ConnectError) Error() string { return e.Reason }
func (e *ConnectError) Unwrap() error { return e.Err }

// tpdPort is how a person finds tpd's port: tpd says it when it starts.
const tpdPort = "is this tpd's port? (tpd prints it at start: listening on …)"

// ExplainConnect turns err, from opening a TCP connection and a TLS session to
// the TP server at addr (HOST:PORT), into a *ConnectError when it knows the
// cause: nothing listens there, the port speaks something other than TLS, or
// the port closed the connection before any answer. It returns err unchanged
// otherwise.
func ExplainConnect(addr string, err error) error {
	var ce *ConnectError
	var nt *NotTLSError
	var na *noAnswerError
	switch {
	case err == nil || errors.As(err, &ce):
		return err
	case errors.Is(err, syscall.ECONNREFUSED):
		return &ConnectError{Addr: addr, Err: err,
			Reason: fmt.Sprintf("cannot reach the TP server at %s: nothing listens there (TCP connection refused); is tpd running, and is this its address?", addr)}
	case errors.As(err, &nt):
		return &ConnectError{Addr: addr, Err: err, Reason: fmt.Sprintf("%s does not speak TLS%s: %s", addr, nt.says(), tpdPort)}
	case errors.As(err, &na):
		return &ConnectError{Addr: addr, Err: err,
			Reason: fmt.Sprintf("%s closed the connection without a TLS answer: is this tpd's port? (tpd prints it at start: listening on …; it also closes at once when this address has too many handshakes under way: then try again)", addr)}
	}
	return err
}

// NotTLSError is a server that answered the TLS client's hello with something
// other than TLS: a plain HTTP server, an echo service, an SSH server.
type NotTLSError struct {
	Answer []byte // the first bytes it sent
}

func (e *NotTLSError) Error() string {
	return "the server answered the TLS hello with something other than TLS" + e.says()
}

// says describes the answer for a person, in parentheses, or says nothing when
// it is neither text nor the hello sent back.
func (e *NotTLSError) says() string {
	a := e.Answer
	if len(a) >= 6 && a[0] == recordHandshake && a[5] == handshakeClientHello {
		return " (it sent back the TLS hello it was sent, as an echo service does)"
	}
	line := a
	for i, b := range a {
		if b == '\r' || b == '\n' {
			line = a[:i]
			break
		}
		if b < ' ' || b > '~' {
			return ""
		}
	}
	if len(line) == 0 {
		return ""
	}
	return fmt.Sprintf(" (it answered %q)", line)
}

// noAnswerError is a connection the server ended before it sent a byte.
type noAnswerError struct{ err error }

func (e *noAnswerError) Error() string {
	return "the server closed the connection without answering: " + e.err.Error()
}
func (e *noAnswerError) Unwrap() error { return e.err }

// TLS record and handshake message types the first bytes of an answer are
// checked against.
const (
	recordAlert          = 21
	recordHandshake      = 22
	handshakeClientHello = 1
	answerHead           = 6 // record header (5 bytes) and the handshake message type
	answerKeep           = 64
)

// CheckTLSAnswer wraps c, the TCP connection below a TLS client, so that the
// first bytes the server sends are checked: a TLS server answers the client's
// hello with a handshake record (its hello) or an alert. Anything else fails
// the read, and so the handshake, with a *NotTLSError; an end before any byte
// fails it with an error ExplainConnect recognizes (which still matches io.EOF
// or ECONNRESET with errors.Is). After the first bytes, reads pass through.
func CheckTLSAnswer(c net.Conn) net.Conn { return &answerConn{Conn: c} }

type answerConn struct {
	net.Conn
	checked bool
	head    []byte // bytes read while checking, not yet returned
	err     error  // the error that came with them
}

// Read is called by one goroutine at a time: the TLS connection above
// serializes its reads.
func (c *answerConn) Read(p []byte) (int, error) {
	if !c.checked {
		if err := c.check(); err != nil {
			return 0, err
		}
	}
	if len(c.head) > 0 {
		n := copy(p, c.head)
		c.head = c.head[n:]
		return n, nil
	}
	if c.err != nil {
		err := c.err
		c.err = nil
		return 0, err
	}
	return c.Conn.Read(p)
}

func (c *answerConn) check() error {
	b := make([]byte, 0, answerKeep)
	var err error
	for len(b) < answerHead && err == nil {
		var n int
		n, err = c.Conn.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
	}
	if len(b) == 0 {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return err // a deadline: the next read checks again
		}
		c.checked = true
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			return &noAnswerError{err}
		}
		return err
	}
	c.checked = true
	if !tlsAnswer(b) {
		return &NotTLSError{Answer: b}
	}
	c.head, c.err = b, err
	return nil
}

// tlsAnswer reports whether b, the first bytes from a server (at least one),
// can begin a TLS server's answer.
func tlsAnswer(b []byte) bool {
	if b[0] != recordAlert && b[0] != recordHandshake {
		return false
	}
	if len(b) > 1 && b[1] != 3 { // the record's major version
		return false
	}
	return len(b) < answerHead || b[0] != recordHandshake || b[5] != handshakeClientHello
}

// CloseWrite half-closes the TCP connection.
func (c *answerConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("this connection cannot half-close")
}

// Unwrap is the TCP connection.
func (c *answerConn) Unwrap() net.Conn { return c.Conn }

// dialChecked is an http.Transport's DialContext whose connections check the
// server's first bytes (CheckTLSAnswer).
func dialChecked(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return CheckTLSAnswer(c), nil
}
