package transport

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// DefaultMaxQUICConns bounds the QUIC connections one Client holds to its server
// when Client.MaxQUICConns is zero. The server grants each connection a number of
// concurrent streams (tpd: quic-max-streams); once the shared connection has none
// left, a request goes to a further connection instead of waiting for a stream to
// end. 128 connections at tpd's default of 1000 streams, or at quic-go's default
// of 100, carry far more tunnels than the server lets one device hold at once
// (tpd: max-sessions-per-identity), which stays the bound.
const DefaultMaxQUICConns = 128

// DefaultQUICPoolIdle is how long a further QUIC connection is kept once its
// last stream ended: a burst of tunnels that comes back soon finds it open.
const DefaultQUICPoolIdle = 30 * time.Second

// extraConn is a QUIC connection a Client opened beside its shared one because
// that had no stream credit left.
type extraConn struct {
	conn    *quic.Conn
	streams int         // requests open on it (pooledStream); quicState.mu
	idle    *time.Timer // closes it when it stayed without streams; quicState.mu
}

func (cl *Client) maxQUICConns() int {
	if cl.MaxQUICConns > 0 {
		return cl.MaxQUICConns
	}
	return DefaultMaxQUICConns
}

// openStream opens a stream for one request: on the shared connection while the
// server lets it open more, else on a further connection of the Client's that
// can, connecting one more (up to MaxQUICConns, one handshake at a time) when none
// can. Only with every connection full does it wait, bounded by ctx, for a stream
// on the shared connection to end. It returns the connection it used, also with
// an error, so that the caller can tell a lost connection (connLost).
func (cl *Client) openStream(ctx context.Context, what string) (*quic.Conn, wire.Stream, error) {
	q := &cl.quic
	for {
		conn, err := cl.quicConn(ctx)
		if err != nil {
			return nil, nil, err
		}
		str, err := conn.OpenStream()
		if err == nil {
			return conn, q.counted(wire.NewQUICStream(conn, str)), nil
		}
		if !errors.As(err, new(*quic.StreamLimitReachedError)) {
			return conn, nil, fmt.Errorf("%s via %s: %w", what, cl.quicAddr(), cl.forgetRejected(ExplainQUIC(err, cl.expiredAdvice)))
		}

		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return nil, nil, ErrClosed
		}
		if e, st := q.openOnExtraLocked(); st != nil {
			q.mu.Unlock()
			return e.conn, st, nil
		}
		if 1+len(q.extra) >= cl.maxQUICConns() {
			q.mu.Unlock()
			return cl.waitStream(ctx, conn, what)
		}
		if ch := q.extraDialing; ch != nil { // another request is connecting one
			q.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, nil, fmt.Errorf("%s via %s: connecting a further QUIC connection: %w", what, cl.quicAddr(), ctx.Err())
			}
		}
		ch := make(chan struct{})
		q.extraDialing = ch
		q.mu.Unlock()

		c, err := cl.connectQUIC(ctx)

		q.mu.Lock()
		q.extraDialing = nil
		close(ch)
		if err != nil {
			q.mu.Unlock()
			return nil, nil, fmt.Errorf("%s: every stream the server allows on the QUIC connection is in use, and a further connection failed: %w", what, err)
		}
		if q.closed {
			q.mu.Unlock()
			_ = c.CloseWithError(wire.QUICNoError, "")
			return nil, nil, ErrClosed
		}
		e := &extraConn{conn: c}
		q.extra = append(q.extra, e)
		str, err = c.OpenStream()
		if err == nil {
			st := q.pooledLocked(e, str)
			q.mu.Unlock()
			return c, st, nil
		}
		q.mu.Unlock()
		if !errors.As(err, new(*quic.StreamLimitReachedError)) {
			// The server closed it at once (busy: max-conns, or shutting down).
			return c, nil, fmt.Errorf("%s via %s: %w", what, cl.quicAddr(), cl.forgetRejected(ExplainQUIC(err, cl.expiredAdvice)))
		}
		// Other requests took its streams meanwhile: look again.
	}
}

// openOnExtraLocked opens a stream on the first further connection that can
// take one, forgetting those that died. q.mu is held.
func (q *quicState) openOnExtraLocked() (*extraConn, wire.Stream) {
	live := q.extra[:0]
	for _, e := range q.extra {
		if e.conn.Context().Err() == nil {
			live = append(live, e)
		} else if e.idle != nil {
			e.idle.Stop()
		}
	}
	clear(q.extra[len(live):])
	q.extra = live
	for _, e := range q.extra {
		if str, err := e.conn.OpenStream(); err == nil {
			return e, q.pooledLocked(e, str)
		}
	}
	return nil, nil
}

// pooledLocked counts a new stream on e until it is closed. q.mu is held.
func (q *quicState) pooledLocked(e *extraConn, str *quic.Stream) wire.Stream {
	e.streams++
	if e.idle != nil {
		e.idle.Stop()
		e.idle = nil
	}
	return &pooledStream{ClientStream: q.counted(wire.NewQUICStream(e.conn, str)), q: q, e: e}
}

// release ends the count of one of e's streams; the connection closes when it
// stays without streams for the pool's idle time.
func (q *quicState) release(e *extraConn) {
	q.mu.Lock()
	defer q.mu.Unlock()
	e.streams--
	if e.streams > 0 || q.closed {
		return
	}
	idle := q.poolIdle
	if idle <= 0 {
		idle = DefaultQUICPoolIdle
	}
	var t *time.Timer
	t = time.AfterFunc(idle, func() {
		q.mu.Lock()
		defer q.mu.Unlock()
		if e.idle != t { // a stream came (and maybe went) meanwhile
			return
		}
		e.idle = nil
		for i, x := range q.extra {
			if x == e {
				q.extra = append(q.extra[:i], q.extra[i+1:]...)
				break
			}
		}
		_ = e.conn.CloseWithError(wire.QUICNoError, "")
	})
	e.idle = t
}

// closeExtrasLocked closes the further connections (Client.Close). q.mu is held.
func (q *quicState) closeExtrasLocked() {
	for _, e := range q.extra {
		if e.idle != nil {
			e.idle.Stop()
			e.idle = nil
		}
		_ = e.conn.CloseWithError(wire.QUICNoError, "")
	}
	q.extra = nil
}

// quicConns is how many QUIC connections the Client holds open: the shared one
// and the further ones.
func (q *quicState) quicConns() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	if q.conn != nil && q.conn.Context().Err() == nil {
		n++
	}
	for _, e := range q.extra {
		if e.conn.Context().Err() == nil {
			n++
		}
	}
	return n
}

// waitStream waits, bounded by ctx, for the server to let conn open one more stream.
func (cl *Client) waitStream(ctx context.Context, conn *quic.Conn, what string) (*quic.Conn, wire.Stream, error) {
	str, err := conn.OpenStreamSync(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return conn, nil, fmt.Errorf("%s via %s: every QUIC stream the server allows on %d connections is in use and none ended in time: %w", what, cl.quicAddr(), cl.maxQUICConns(), ctx.Err())
		}
		return conn, nil, fmt.Errorf("%s via %s: %w", what, cl.quicAddr(), cl.forgetRejected(ExplainQUIC(err, cl.expiredAdvice)))
	}
	return conn, cl.quic.counted(wire.NewQUICStream(conn, str)), nil
}

// pooledStream is a stream on a further connection: it counts as open there
// until it is closed or aborted.
type pooledStream struct {
	*ClientStream
	q    *quicState
	e    *extraConn
	once sync.Once
}

func (p *pooledStream) Close() error {
	err := p.ClientStream.Close()
	p.once.Do(func() { p.q.release(p.e) })
	return err
}

func (p *pooledStream) Abort(code quic.ApplicationErrorCode) {
	p.ClientStream.Abort(code)
	p.once.Do(func() { p.q.release(p.e) })
}

// QUICConns is how many QUIC connections the Client holds open to its server:
// the shared one and the further ones that requests beyond its stream limit use.
func (cl *Client) QUICConns() int { return cl.quic.quicConns() }
