package reverse

// The byte streams of reverse tunnels: a hijacked HTTP/1.1 connection, the
// request and response bodies of an h2 extended CONNECT stream, and the
// CONNECT streams of a bound tunnel. (An h3 request stream taken over from
// the server is the proxy's, which serves h3 CONNECT with it too.)

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/net/http2"

	"github.com/tp-proxy/tp/proxy/wire"
)

// TunnelConn is a tunnel's byte stream. Done is closed when it is closed or
// aborted; the handler that established it returns then.
type TunnelConn interface {
	wire.Stream
	Done() <-chan struct{}
}

// Hijacked is an HTTP/1.1 connection taken from net/http: Conn, and what
// net/http read of it already.
type Hijacked struct {
	Conn net.Conn
	br   *bufio.Reader
}

// Hijack takes the connection of w's request from net/http.
func Hijack(w http.ResponseWriter) (*Hijacked, error) {
	c, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return &Hijacked{Conn: c, br: brw.Reader}, nil
}

// Tunnel is the connection as a tunnel's byte stream, once the answer that
// establishes the tunnel is written.
func (h *Hijacked) Tunnel() TunnelConn {
	return &hjConn{Conn: h.Conn, br: h.br, done: make(chan struct{})}
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
// while its handler runs: the handler waits for Done, then calls Finish, which
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

// NewStreamConn is the stream of r, an extended CONNECT over h2 that w
// answered, as a tunnel's byte stream. Its handler calls Finish after Done.
func NewStreamConn(w http.ResponseWriter, r *http.Request) TunnelConn {
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

// Finish ends conn on its handler's goroutine: it closes it, and for the
// stream of an extended CONNECT unblocks the reads and writes in flight and
// waits for them, then resets the stream if it was aborted.
func Finish(conn TunnelConn) {
	_ = conn.Close()
	if sc, ok := conn.(*streamConn); ok {
		sc.finish()
	}
}

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

var (
	_ TunnelConn = (*hjConn)(nil)
	_ TunnelConn = (*streamConn)(nil)
)

// BindConnect opens a CONNECT stream on the bound tunnel cc of a listen-tcp
// target for one public connection (peer, from the public port by), waiting
// up to pickup for the tunnel's answer.
func BindConnect(ctx context.Context, cc *http2.ClientConn, t Target, pickup time.Duration, peer, by string) (wire.Stream, *wire.HelloError) {
	ctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	authority := net.JoinHostPort(strings.Trim(t.Addr, "[]"), strconv.Itoa(t.Port))
	req := (&http.Request{
		Method: http.MethodConnect, URL: &url.URL{Host: authority}, Host: authority,
		Header: http.Header{"Forwarded": {Forwarded(peer, by)}}, Body: pr, ContentLength: -1,
		Proto: "HTTP/2.0", ProtoMajor: 2,
	}).WithContext(ctx)
	timer := time.AfterFunc(pickup, cancel)
	resp, err := cc.RoundTrip(req)
	if !timer.Stop() && err == nil {
		_ = resp.Body.Close()
		err = errors.New("timed out")
	}
	if err != nil {
		cancel()
		return nil, wire.Errorf(wire.CodeReverseOffline, "CONNECT on the bound tunnel of %s: %v", t, err)
	}
	if resp.StatusCode/100 != 2 {
		_ = resp.Body.Close()
		cancel()
		return nil, wire.Errorf(wire.CodeReverseBusy, "the bound tunnel of %s answered CONNECT with %s", t, resp.Status)
	}
	return &bindStream{body: resp.Body, pw: pw, cancel: cancel, peer: addrOf(peer), local: addrOf(by)}, nil
}

// bindStream is one CONNECT stream of a bound tunnel.
type bindStream struct {
	body        io.ReadCloser
	pw          *io.PipeWriter
	cancel      context.CancelFunc
	peer, local net.Addr
}

func (b *bindStream) Read(p []byte) (int, error)  { return b.body.Read(p) }
func (b *bindStream) Write(p []byte) (int, error) { return b.pw.Write(p) }
func (b *bindStream) CloseWrite() error           { return b.pw.Close() }
func (b *bindStream) Close() error {
	_ = b.pw.Close()
	err := b.body.Close()
	b.cancel()
	return err
}

// Abort resets the stream (RST_STREAM CANCEL).
func (b *bindStream) Abort(quic.ApplicationErrorCode) {
	b.cancel()
	_ = b.pw.CloseWithError(errors.New("aborted"))
}
func (b *bindStream) LocalAddr() net.Addr              { return b.local }
func (b *bindStream) RemoteAddr() net.Addr             { return b.peer }
func (b *bindStream) SetDeadline(time.Time) error      { return nil }
func (b *bindStream) SetReadDeadline(time.Time) error  { return nil }
func (b *bindStream) SetWriteDeadline(time.Time) error { return nil }
