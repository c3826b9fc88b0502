package clients

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Over TLS every session needs its own TLS connection to the TP server: a TCP
// connect and a handshake (a hybrid post-quantum key exchange even when the
// session resumes), about a millisecond on a small machine, on the path of every
// new session of `tp forward --transport tls` and of an agent's accept
// connections. While sessions come close together, the Dialer keeps one (or
// Dialer.Spares) handshaken connection in reserve, made after a session got
// going, so the next session starts with its hello. With two or more, a spare
// made after one session has the whole next session's time to finish its
// handshake on the server's side (which verifies the client certificate after
// the client is done) before a session takes it. A spare is never older than spareMaxAge (the
// server closes a connection whose hello has not come within its hello timeout,
// 10 s by default), and none is made for dials further apart than spareWindow:
// an idle forwarder or agent holds no connection and makes no handshakes.
const (
	spareMaxAge = 3 * time.Second
	spareWindow = 3 * time.Second
)

// maxSpares bounds Dialer.Spares.
const maxSpares = 8

type spareTLS struct {
	mu      sync.Mutex
	conns   []spareConn // oldest first
	last    time.Time   // the previous session's start
	burst   bool        // the previous session started within spareWindow of the one before
	filling bool
	closed  bool
}

type spareConn struct {
	conn *tls.Conn
	made time.Time
}

// spares is how many spare connections the Dialer keeps in a burst.
func (d *Dialer) spares() int {
	return min(max(d.Spares, 1), maxSpares)
}

// sessionTLS returns a TLS connection for a new session: the oldest fresh spare
// when there is one (spare true; the oldest is the likeliest to be through its
// handshake on the server's side too), else a new connection.
func (d *Dialer) sessionTLS(ctx context.Context) (conn *tls.Conn, spare bool, err error) {
	s := &d.spare
	s.mu.Lock()
	now := time.Now()
	var stale []*tls.Conn
	for len(s.conns) > 0 && conn == nil {
		c := s.conns[0]
		s.conns = s.conns[1:]
		if now.Sub(c.made) < spareMaxAge {
			conn = c.conn
		} else {
			stale = append(stale, c.conn)
		}
	}
	s.burst = !s.last.IsZero() && now.Sub(s.last) < spareWindow
	s.last = now
	s.mu.Unlock()
	for _, c := range stale {
		_ = c.Close()
	}
	if conn != nil {
		return conn, true, nil
	}
	conn, err = d.connectTLS(ctx)
	return conn, false, err
}

// refillSpare makes new spares in the background, one at a time up to
// Dialer.Spares, when sessions come close together. Callers call it once the
// session's own setup is done, so the handshakes do not compete with it for the
// CPU.
func (d *Dialer) refillSpare() {
	s := &d.spare
	s.mu.Lock()
	if !s.burst || s.filling || s.closed || len(s.conns) >= d.spares() {
		s.mu.Unlock()
		return
	}
	s.filling = true
	s.mu.Unlock()
	go func() {
		for {
			// Not a request's context: the spare outlives the session that asked
			// for it; spareMaxAge bounds the connect, and Close discards the result.
			ctx, cancel := context.WithTimeout(context.Background(), spareMaxAge)
			conn, err := d.connectTLS(ctx)
			cancel()
			s.mu.Lock()
			if err != nil || s.closed || len(s.conns) >= d.spares() {
				s.filling = false
				s.mu.Unlock()
				if conn != nil {
					_ = conn.Close()
				}
				return
			}
			s.conns = append(s.conns, spareConn{conn: conn, made: time.Now()})
			if len(s.conns) >= d.spares() {
				s.filling = false
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
		}
	}()
}

// closeSpare discards the spares and makes no more (Dialer.Close).
func (d *Dialer) closeSpare() {
	s := &d.spare
	s.mu.Lock()
	s.closed = true
	cs := s.conns
	s.conns = nil
	s.mu.Unlock()
	for _, c := range cs {
		_ = c.conn.Close()
	}
}

// requestTLS runs a request on a new session's TLS connection. A failure on a
// spare that says nothing about the request (the server closed the idle
// connection, or answered hello_timeout because it waited longer than its
// hello timeout) is retried once on a new connection.
func (d *Dialer) requestTLS(ctx context.Context, addr string, hello wire.ClientHello, early *earlyDial) (net.Conn, error) {
	conn, spare, err := d.sessionTLS(ctx)
	if err != nil {
		return nil, err
	}
	c, err := d.request(ctx, conn, addr, hello, early)
	if spare && ctx.Err() == nil && retryOnNew(err, early) {
		if conn, err = d.connectTLS(ctx); err != nil {
			return nil, err
		}
		c, err = d.request(ctx, conn, addr, hello, early)
	}
	if hello.Op != wire.OpAccept {
		// (An agent refills after an accept once its session has its first
		// answer, Agent.acceptTLS, so that the handshake does not compete with
		// the session's own setup for the CPU.)
		d.refillSpare()
	}
	return c, err
}

// retryOnNew says whether a request that failed with err on a spare connection
// goes again on a new one: when the failure says nothing about the request (the
// server closed the idle connection, or answered hello_timeout because it
// waited longer than its hello timeout). Not after a failure without an answer
// when the dial's first bytes went sealed in an attach: the server may have
// passed them on to the agent before the connection failed, and a request must
// not reach a service twice (as for early bytes over QUIC, early.go).
func retryOnNew(err error, early *earlyDial) bool {
	var xe *exchangeError
	var re *RefusedError
	switch {
	case errors.As(err, &re):
		return re.Code == wire.CodeHelloTimeout
	case errors.As(err, &xe):
		return mayResend(err, early)
	}
	return false
}

// mayResend says whether a dial that failed with err may go again on another
// connection: not once its first bytes went sealed in an attach (they may have
// reached the service), unless the server answered with a stateless reset (it
// held nothing of the connection, so it saw neither the hello nor the bytes).
func mayResend(err error, early *earlyDial) bool {
	return early == nil || !early.sealed || errors.As(err, new(*quic.StatelessResetError))
}
