package transport

import (
	"context"
	"crypto/tls"
	"fmt"
	"sync"
	"time"
)

// Over TLS every session needs its own TLS connection to the TP server: a TCP
// connect and a handshake (a hybrid post-quantum key exchange even when the
// session resumes), about a millisecond on a small machine, on the path of every
// new session of `tp forward --transport tls` and of an agent's accept
// connections. While sessions come close together, the Client keeps one (or
// Client.Spares) handshaken connection in reserve, made after a session got
// its answer, so the next session starts with its hello; a session that comes
// while the spare is still being made waits for it rather than making one of
// its own (which would start later, cost a second handshake, and leave the
// next session without a spare in turn). With two or more, a spare
// made after one session has the whole next session's time to finish its
// handshake on the server's side (which verifies the client certificate after
// the client is done) before a session takes it. A spare is never older than spareMaxAge (the
// server closes a connection whose hello has not come within its hello timeout,
// 10 s by default), one the server has closed is discarded (ConnOpen), and
// none is made for dials further apart than spareWindow:
// an idle forwarder or agent holds no connection and makes no handshakes.
const (
	spareMaxAge = 3 * time.Second
	spareWindow = 3 * time.Second
)

// maxSpares bounds Client.Spares.
const maxSpares = 8

type spareTLS struct {
	mu      sync.Mutex
	conns   []spareConn // oldest first
	last    time.Time   // the previous session's start
	burst   bool        // the previous session started within spareWindow of the one before
	filling bool
	closed  bool
	// waiter: a session without a spare waits for the one being made
	// (filling) instead of making its own; one at a time, so that a burst
	// does not queue behind a single handshake. changed is closed (and
	// replaced) when a spare is added or filling ends.
	waiter  bool
	changed chan struct{}
	// maxAge and window are spareMaxAge and spareWindow when zero; tests
	// that must not depend on how fast the machine is lengthen them.
	maxAge, window time.Duration
}

// maxAgeOr is how old a spare may be (spareMaxAge unless set).
func (s *spareTLS) maxAgeOr() time.Duration {
	if s.maxAge > 0 {
		return s.maxAge
	}
	return spareMaxAge
}

// windowOr is how close together sessions make a burst (spareWindow unless set).
func (s *spareTLS) windowOr() time.Duration {
	if s.window > 0 {
		return s.window
	}
	return spareWindow
}

type spareConn struct {
	conn *tls.Conn
	made time.Time
}

// spares is how many spare connections the Client keeps in a burst.
func (cl *Client) spares() int {
	return min(max(cl.Spares, 1), maxSpares)
}

// sessionTLS returns a TLS connection for a new session: the oldest fresh spare
// when there is one (spare true; the oldest is the likeliest to be through its
// handshake on the server's side too), else the spare being made, if no other
// session waits for it already (it started before this session, so it is done
// before a new connection would be), else a new connection.
//
// open says whether the connection is known to be open: a new one, or a spare
// whose TCP connection the server has not closed (ConnOpen). A spare found
// closed is discarded. Only on an open connection may a dial send its first
// bytes without waiting for the answer (early.go): tpd ends an idle connection
// that its hello does not reach within its hello timeout, or when it restarts.
func (cl *Client) sessionTLS(ctx context.Context) (conn *tls.Conn, spare, open bool, err error) {
	s := &cl.spare
	s.mu.Lock()
	now := time.Now()
	s.burst = !s.last.IsZero() && now.Sub(s.last) < s.windowOr()
	s.last = now
	var stale []*tls.Conn
	waited := false
	for {
		conn, open, stale = s.takeLocked(time.Now(), stale)
		if conn != nil || !s.filling || s.closed || (s.waiter && !waited) {
			break
		}
		s.waiter, waited = true, true
		if s.changed == nil {
			s.changed = make(chan struct{})
		}
		changed := s.changed
		s.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
		}
		s.mu.Lock()
		if ctx.Err() != nil {
			break
		}
	}
	if waited {
		s.waiter = false
	}
	s.mu.Unlock()
	for _, c := range stale {
		_ = c.Close()
	}
	if conn != nil {
		return conn, true, open, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, false, false, fmt.Errorf("connecting to TP server %s: %w", cl.Server, err)
	}
	conn, err = cl.ConnectTLS(ctx)
	return conn, false, err == nil, err
}

// takeLocked takes the oldest spare younger than spareMaxAge and not closed by
// the server, adding the others to stale for the caller to close. open says
// whether the spare is known to be open.
func (s *spareTLS) takeLocked(now time.Time, stale []*tls.Conn) (*tls.Conn, bool, []*tls.Conn) {
	for len(s.conns) > 0 {
		c := s.conns[0]
		s.conns = s.conns[1:]
		if now.Sub(c.made) < s.maxAgeOr() {
			open, known := ConnOpen(c.conn)
			if open || !known {
				return c.conn, open, stale
			}
		}
		stale = append(stale, c.conn)
	}
	return nil, false, stale
}

// notifyLocked wakes a session waiting for a spare.
func (s *spareTLS) notifyLocked() {
	if s.changed != nil {
		close(s.changed)
		s.changed = nil
	}
}

// refillSpare makes new spares in the background, one at a time up to
// Client.Spares, when sessions come close together. Callers call it once the
// session's own setup is done, so the handshakes do not compete with it for the
// CPU.
func (cl *Client) refillSpare() {
	if cl.tlsMux.Live() {
		return // dials are streams of a tp-mux connection: no handshake per dial to save
	}
	s := &cl.spare
	s.mu.Lock()
	if !s.burst || s.filling || s.closed || len(s.conns) >= cl.spares() {
		s.mu.Unlock()
		return
	}
	s.filling = true
	s.mu.Unlock()
	go func() {
		for {
			// Not a request's context: the spare outlives the session that asked
			// for it; spareMaxAge bounds the connect, and Close discards the result.
			ctx, cancel := context.WithTimeout(context.Background(), s.maxAgeOr())
			conn, err := cl.ConnectTLS(ctx)
			cancel()
			s.mu.Lock()
			if err != nil || s.closed || len(s.conns) >= cl.spares() {
				s.filling = false
				s.notifyLocked()
				s.mu.Unlock()
				if conn != nil {
					_ = conn.Close()
				}
				return
			}
			s.conns = append(s.conns, spareConn{conn: conn, made: time.Now()})
			s.notifyLocked()
			if len(s.conns) >= cl.spares() {
				s.filling = false
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
		}
	}()
}

// closeSpare discards the spares and makes no more (Client.Close).
func (cl *Client) closeSpare() {
	cl.tlsMux.Close() // and the tp-mux connections (tlsmux.go)
	s := &cl.spare
	s.mu.Lock()
	s.closed = true
	s.notifyLocked()
	cs := s.conns
	s.conns = nil
	s.mu.Unlock()
	for _, c := range cs {
		_ = c.conn.Close()
	}
}
