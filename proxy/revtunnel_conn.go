package proxy

// The byte streams of reverse tunnels: a hijacked HTTP/1.1 connection, the
// request and response bodies of an h2 extended CONNECT stream, or an h3
// request stream taken over from the server.

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// tunnelConn is a tunnel's byte stream. Done is closed when it is closed or
// aborted; the handler that established it returns then.
type tunnelConn interface {
	wire.Stream
	Done() <-chan struct{}
}

type atomicCount struct{ atomic.Int64 }

// hijacked is an HTTP/1.1 connection taken from net/http.
type hijacked struct {
	conn net.Conn
	br   *bufio.Reader
}

func hijack(w http.ResponseWriter) (*hijacked, error) {
	c, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return &hijacked{conn: c, br: brw.Reader}, nil
}

func (h *hijacked) tunnel() tunnelConn {
	return &hjConn{Conn: h.conn, br: h.br, done: make(chan struct{})}
}

// hjConn reads what net/http buffered before the connection's own bytes.
type hjConn struct {
	net.Conn
	br   *bufio.Reader
	once sync.Once
	done chan struct{}
}

func (c *hjConn) Read(p []byte) (int, error) {
	if c.br != nil && c.br.Buffered() > 0 {
		return c.br.Read(p)
	}
	return c.Conn.Read(p)
}

func (c *hjConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.done) })
	return err
}

func (c *hjConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

func (c *hjConn) Done() <-chan struct{} { return c.done }

// Unwrap lets wire.Abort reset the TCP connection underneath.
func (c *hjConn) Unwrap() net.Conn { return c.Conn }

// streamConn is an extended CONNECT stream as a net.Conn: reads come from the
// request body, writes go to the response body, flushed at once. It is valid
// while its handler runs: the handler waits for Done, then calls finish, which
// stops further use and waits for the reads and writes in flight.
type streamConn struct {
	w     http.ResponseWriter
	body  io.ReadCloser
	rc    *http.ResponseController
	local net.Addr
	peer  net.Addr

	mu      sync.Mutex
	closed  bool
	aborted bool
	busy    sync.WaitGroup
	done    chan struct{}
}

func newStreamConn(w http.ResponseWriter, r *http.Request) *streamConn {
	c := &streamConn{w: w, body: r.Body, rc: http.NewResponseController(w), done: make(chan struct{})}
	// A tunnel outlives any per-request timeout the server set on the stream.
	_ = c.rc.SetReadDeadline(time.Time{})
	_ = c.rc.SetWriteDeadline(time.Time{})
	c.peer = addrOf(r.RemoteAddr)
	if la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		c.local = la
	} else {
		c.local = addrOf("")
	}
	return c
}

type strAddr string

func (a strAddr) Network() string { return "tcp" }
func (a strAddr) String() string  { return string(a) }

func addrOf(s string) net.Addr {
	if ap, err := net.ResolveTCPAddr("tcp", s); err == nil && s != "" {
		return ap
	}
	return strAddr(s)
}

func (c *streamConn) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.busy.Add(1)
	return true
}

func (c *streamConn) Read(p []byte) (int, error) {
	if !c.enter() {
		return 0, net.ErrClosed
	}
	defer c.busy.Done()
	return c.body.Read(p)
}

func (c *streamConn) Write(p []byte) (int, error) {
	if !c.enter() {
		return 0, net.ErrClosed
	}
	defer c.busy.Done()
	n, err := c.w.Write(p)
	if err == nil {
		err = c.rc.Flush()
	}
	return n, err
}

func (c *streamConn) end(abort bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed, c.aborted = true, abort
	close(c.done)
}

// Close ends the stream cleanly (END_STREAM, a QUIC FIN) when the handler returns.
func (c *streamConn) Close() error { c.end(false); return nil }

// Abort ends the stream with a reset (RST_STREAM, RESET_STREAM), so that the
// peer cannot take the cut for a clean end (wire.Abort finds it).
func (c *streamConn) Abort(quic.ApplicationErrorCode) { c.end(true) }

// CloseWrite is not possible: net/http ends a response only when its handler
// returns, which also ends the request body. wire.Bridge then closes the
// stream (docs/HTTP.md §2 says so).
func (c *streamConn) CloseWrite() error { return errors.ErrUnsupported }

func (c *streamConn) Done() <-chan struct{} { return c.done }

// finish runs on the handler's goroutine after Done: it unblocks the reads and
// writes in flight and waits for them, then resets the stream if it was aborted.
func (c *streamConn) finish() {
	_ = c.rc.SetReadDeadline(time.Now())
	_ = c.rc.SetWriteDeadline(time.Now())
	_ = c.body.Close()
	c.busy.Wait()
	if c.aborted {
		panic(http.ErrAbortHandler) // net/http resets the stream; nothing is logged
	}
}

func (c *streamConn) LocalAddr() net.Addr  { return c.local }
func (c *streamConn) RemoteAddr() net.Addr { return c.peer }

func (c *streamConn) SetDeadline(t time.Time) error {
	return errors.Join(c.SetReadDeadline(t), c.SetWriteDeadline(t))
}

func (c *streamConn) SetReadDeadline(t time.Time) error {
	if !c.enter() {
		return net.ErrClosed
	}
	defer c.busy.Done()
	if err := c.rc.SetReadDeadline(t); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return err
	}
	return nil
}

func (c *streamConn) SetWriteDeadline(t time.Time) error {
	if !c.enter() {
		return net.ErrClosed
	}
	defer c.busy.Done()
	if err := c.rc.SetWriteDeadline(t); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return err
	}
	return nil
}

// h3TunnelConn is an h3 extended CONNECT stream taken over from quic-go's
// server (http3.HTTPStreamer), as a CONNECT's is: DATA frames each way, FIN for
// each direction's clean end (CloseWrite), a reset of both directions for an
// abort. Unlike streamConn it carries half-close.
type h3TunnelConn struct {
	*h3Stream
	once sync.Once
	done chan struct{}
}

func (c *h3TunnelConn) Close() error {
	err := c.h3Stream.Close()
	c.once.Do(func() { close(c.done) })
	return err
}

func (c *h3TunnelConn) Abort(code quic.ApplicationErrorCode) {
	c.h3Stream.Abort(code)
	c.once.Do(func() { close(c.done) })
}

func (c *h3TunnelConn) Done() <-chan struct{} { return c.done }

var (
	_ tunnelConn = (*hjConn)(nil)
	_ tunnelConn = (*streamConn)(nil)
	_ tunnelConn = (*h3TunnelConn)(nil)
)
