package proxy

import (
	"context"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// byeWait bounds how long op "bye" waits for the other streams of its
// connection to end before it answers anyway.
const byeWait = 10 * time.Second

// connStreams counts the request streams of a QUIC connection whose client
// direction the server has not yet read to its end (and passed on), for op
// "bye" (docs/PROTOCOL.md, section 3.9): a stream leaves the count when its
// session's bridge read the client's FIN (wire.ReadEnder), or when its
// request is over, whichever comes first. A session whose destination still
// holds its side open does not hold up the answer: the client's close now
// discards nothing.
type connStreams struct {
	mu      sync.Mutex
	n       int
	changed chan struct{} // closed, and replaced, when a stream ends
}

type connStreamsKey struct{}

func newConnStreams() *connStreams { return &connStreams{changed: make(chan struct{})} }

func (c *connStreams) start() {
	c.mu.Lock()
	c.n++
	c.mu.Unlock()
}

func (c *connStreams) end() {
	c.mu.Lock()
	c.n--
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

// waitAlone waits until the caller's stream is the only one counted, or ctx
// ends.
func (c *connStreams) waitAlone(ctx context.Context) {
	for {
		c.mu.Lock()
		n, changed := c.n, c.changed
		c.mu.Unlock()
		if n <= 1 {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// bye answers op "bye": once every other stream of the connection has been
// read to its end (each session's last bytes and FIN read and passed on), or
// its request is over, or after byeWait, the server says ok; the client then closes the connection
// knowing that its close discards nothing the server had yet to read. On a
// connection that carries one request (TLS) there is nothing to wait for.
// It is housekeeping, not a session: it is neither logged nor audited.
func (s *Server) bye(ctx context.Context, conn wire.Stream) *wire.HelloError {
	if cs, ok := ctx.Value(connStreamsKey{}).(*connStreams); ok {
		if f := s.onBye.Load(); f != nil {
			(*f)()
		}
		wctx, cancel := context.WithTimeout(ctx, byeWait)
		cs.waitAlone(wctx)
		cancel()
	}
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true}); err == nil {
		_ = conn.CloseWrite()
	}
	_ = conn.Close()
	return errHandled
}
