package clients

// An RFC 9298 (CONNECT-UDP) client, written from the RFC: it asks a MASQUE
// proxy (TP's proxy names, or any other) for a UDP flow to a target and
// carries UDP payloads as HTTP Datagrams with context ID 0 (RFC 9297): in QUIC
// DATAGRAM frames over h3 when both ends negotiated them, else as DATAGRAM
// capsules on the request stream (h2 extended CONNECT, HTTP/1.1 Upgrade, or h3
// without datagrams). docs/HTTP.md, section 5, describes what TP's proxy does.

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"
	"golang.org/x/net/http2"
)

// DefaultConnectUDPTemplate is RFC 9298's default URI template path.
const DefaultConnectUDPTemplate = "/.well-known/masque/udp/{target_host}/{target_port}/"

// ConnectUDPOptions say how to reach a CONNECT-UDP proxy.
type ConnectUDPOptions struct {
	// Proxy is the proxy's host:port (TCP for h2 and http/1.1, UDP for h3).
	Proxy string
	// TLS is the client's TLS configuration: ServerName the proxy name, the
	// device certificate, the roots. NextProtos is set per HTTP version.
	TLS *tls.Config
	// Template is the proxy's URI template (absolute path, or URL whose path
	// and query are used); default DefaultConnectUDPTemplate.
	Template string
	// HTTP is "h3" (default), "h2" or "http/1.1".
	HTTP string
	// NoDatagrams makes an h3 client announce no HTTP Datagram support, so the
	// flow uses capsules on the stream as over h2.
	NoDatagrams bool
	// QueueLen bounds the received datagrams waiting for ReadDatagram; more
	// are dropped and counted (Dropped). Default 256.
	QueueLen int
}

// ConnectUDPError is a proxy's refusal: its status, Proxy-Status header field
// (RFC 9209) and the reason it gave in the body.
type ConnectUDPError struct {
	Status      int
	ProxyStatus string
	Reason      string
}

func (e *ConnectUDPError) Error() string {
	r := e.Reason
	if r == "" {
		r = e.ProxyStatus
	}
	return fmt.Sprintf("the proxy refused the CONNECT-UDP request with status %d: %s", e.Status, r)
}

// ConnectUDPConn is an established CONNECT-UDP flow. Its methods are safe for
// concurrent use.
type ConnectUDPConn struct {
	// Datagrams reports whether payloads travel as HTTP/3 datagrams (else as
	// capsules on the stream).
	Datagrams bool
	// Response is the proxy's 2xx (101 over HTTP/1.1) answer.
	Response *http.Response

	dg      interface{ SendDatagram([]byte) error }
	w       io.Writer
	wmu     sync.Mutex
	in      chan []byte
	errc    chan struct{} // closed when the stream ends
	err     atomic.Pointer[error]
	dropped atomic.Int64
	closeFn func(abort bool)
	closeW  func() error // ends the client's direction only
	once    sync.Once
}

// DialConnectUDP asks the proxy for a UDP flow to target (host:port).
func DialConnectUDP(ctx context.Context, o ConnectUDPOptions, target string) (*ConnectUDPConn, error) {
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return nil, fmt.Errorf("CONNECT-UDP target %q: %w", target, err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return nil, fmt.Errorf("CONNECT-UDP target %q has no valid port", target)
	}
	if o.TLS == nil {
		return nil, errors.New("CONNECT-UDP needs a TLS configuration with the device certificate")
	}
	tmpl := o.Template
	if tmpl == "" {
		tmpl = DefaultConnectUDPTemplate
	}
	path := ExpandConnectUDPTemplate(tmpl, host, port)
	authority := o.Proxy
	if o.TLS.ServerName != "" {
		_, pport, err := net.SplitHostPort(o.Proxy)
		if err == nil {
			authority = net.JoinHostPort(o.TLS.ServerName, pport)
		}
	}
	u, err := url.Parse("https://" + authority + path)
	if err != nil {
		return nil, fmt.Errorf("CONNECT-UDP template %q gives no valid URL: %w", tmpl, err)
	}
	if o.QueueLen <= 0 {
		o.QueueLen = 256
	}
	c := &ConnectUDPConn{in: make(chan []byte, o.QueueLen), errc: make(chan struct{})}
	switch o.HTTP {
	case "", "h3":
		err = c.dialH3(ctx, o, u)
	case "h2":
		err = c.dialH2(ctx, o, u)
	case "http/1.1":
		err = c.dialH1(ctx, o, u)
	default:
		return nil, fmt.Errorf("CONNECT-UDP over %q: choose h3, h2 or http/1.1", o.HTTP)
	}
	if err != nil {
		return nil, err
	}
	return c, nil
}

// ExpandConnectUDPTemplate fills tmpl's {target_host} and {target_port}
// (RFC 9298 §2: an IPv6 literal with its colons percent-encoded) and returns
// the path and query.
func ExpandConnectUDPTemplate(tmpl, host, port string) string {
	if i := strings.Index(tmpl, "://"); i >= 0 {
		rest := tmpl[i+3:]
		if j := strings.IndexByte(rest, '/'); j >= 0 {
			tmpl = rest[j:]
		}
	}
	path, query, hasQuery := strings.Cut(tmpl, "?")
	esc := func(s string) string { return strings.ReplaceAll(url.PathEscape(s), ":", "%3A") }
	path = strings.NewReplacer("{target_host}", esc(host), "{target_port}", esc(port)).Replace(path)
	if hasQuery {
		query = strings.NewReplacer("{target_host}", url.QueryEscape(host), "{target_port}", url.QueryEscape(port)).Replace(query)
		return path + "?" + query
	}
	return path
}

// refusal reads a non-2xx answer into a ConnectUDPError.
func connectUDPRefusal(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	_ = resp.Body.Close()
	return &ConnectUDPError{Status: resp.StatusCode, ProxyStatus: resp.Header.Get("Proxy-Status"), Reason: strings.TrimSpace(string(b))}
}

func (c *ConnectUDPConn) dialH3(ctx context.Context, o ConnectUDPOptions, u *url.URL) error {
	tc := o.TLS.Clone()
	tc.NextProtos = []string{http3.NextProtoH3}
	qc, err := quic.DialAddr(ctx, o.Proxy, tc, &quic.Config{EnableDatagrams: !o.NoDatagrams, KeepAlivePeriod: 15 * time.Second})
	if err != nil {
		return fmt.Errorf("connecting to the CONNECT-UDP proxy %s over QUIC: %w", o.Proxy, err)
	}
	cc := (&http3.Transport{EnableDatagrams: !o.NoDatagrams}).NewClientConn(qc)
	fail := func(err error) error {
		_ = qc.CloseWithError(0, "")
		return err
	}
	select {
	case <-cc.ReceivedSettings():
	case <-qc.Context().Done(): // e.g. the proxy refused the certificate after the handshake
		return fail(fmt.Errorf("the CONNECT-UDP proxy %s closed the connection: %w", o.Proxy, context.Cause(qc.Context())))
	case <-ctx.Done():
		return fail(fmt.Errorf("waiting for the proxy's HTTP/3 SETTINGS: %w", ctx.Err()))
	}
	if !cc.Settings().EnableExtendedConnect {
		return fail(errors.New("the proxy does not offer extended CONNECT over HTTP/3, which CONNECT-UDP needs"))
	}
	str, err := cc.OpenRequestStream(ctx)
	if err != nil {
		return fail(err)
	}
	req := &http.Request{Method: http.MethodConnect, Proto: "connect-udp", URL: u, Host: u.Host,
		Header: http.Header{http3.CapsuleProtocolHeader: {"?1"}}}
	if err := str.SendRequestHeader(req); err != nil {
		return fail(err)
	}
	resp, err := str.ReadResponse()
	if err != nil {
		return fail(fmt.Errorf("reading the proxy's answer: %w", err))
	}
	if resp.StatusCode/100 != 2 {
		return fail(connectUDPRefusal(resp))
	}
	c.Response = resp
	c.w = str
	c.Datagrams = !o.NoDatagrams && cc.Settings().EnableDatagrams
	c.closeW = str.Close
	c.closeFn = func(abort bool) {
		if abort {
			str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		} else {
			_ = str.Close()
		}
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
		_ = qc.CloseWithError(0, "")
	}
	go c.readCapsules(str)
	if c.Datagrams {
		c.dg = str
		go func() {
			for {
				p, err := str.ReceiveDatagram(context.Background())
				if err != nil {
					return
				}
				c.deliver(p)
			}
		}()
	}
	return nil
}

func (c *ConnectUDPConn) dialH2(ctx context.Context, o ConnectUDPOptions, u *url.URL) error {
	tc := o.TLS.Clone()
	tc.NextProtos = []string{"h2"}
	d := &tls.Dialer{Config: tc}
	conn, err := d.DialContext(ctx, "tcp", o.Proxy)
	if err != nil {
		return fmt.Errorf("connecting to the CONNECT-UDP proxy %s: %w", o.Proxy, err)
	}
	if p := conn.(*tls.Conn).ConnectionState().NegotiatedProtocol; p != "h2" {
		_ = conn.Close()
		return fmt.Errorf("the proxy %s chose %q, not h2", o.Proxy, p)
	}
	cc, err := (&http2.Transport{}).NewClientConn(conn)
	if err != nil {
		_ = conn.Close()
		return err
	}
	pr, pw := io.Pipe()
	req := (&http.Request{Method: http.MethodConnect, URL: u, Host: u.Host, Body: pr,
		Header: http.Header{":protocol": {"connect-udp"}, http3.CapsuleProtocolHeader: {"?1"}}}).WithContext(context.WithoutCancel(ctx))
	resp, err := cc.RoundTrip(req)
	if err != nil {
		_ = cc.Close()
		return fmt.Errorf("CONNECT-UDP over h2: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		_ = pw.Close()
		err := connectUDPRefusal(resp)
		_ = cc.Close()
		return err
	}
	c.Response = resp
	c.w = pw
	c.closeW = pw.Close
	c.closeFn = func(abort bool) {
		if abort {
			_ = pw.CloseWithError(errors.New("CONNECT-UDP flow aborted"))
		} else {
			_ = pw.Close()
		}
		_ = resp.Body.Close()
		_ = cc.Close()
	}
	go c.readCapsules(resp.Body)
	return nil
}

func (c *ConnectUDPConn) dialH1(ctx context.Context, o ConnectUDPOptions, u *url.URL) error {
	tc := o.TLS.Clone()
	tc.NextProtos = []string{"http/1.1"}
	d := &tls.Dialer{Config: tc}
	conn, err := d.DialContext(ctx, "tcp", o.Proxy)
	if err != nil {
		return fmt.Errorf("connecting to the CONNECT-UDP proxy %s: %w", o.Proxy, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	_, err = fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\nCapsule-Protocol: ?1\r\n\r\n", u.RequestURI(), u.Host)
	if err != nil {
		_ = conn.Close()
		return err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil {
		_ = conn.Close()
		return fmt.Errorf("reading the proxy's answer: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		err := connectUDPRefusal(resp)
		_ = conn.Close()
		return err
	}
	_ = conn.SetDeadline(time.Time{})
	c.Response = resp
	c.w = conn
	c.closeW = conn.(*tls.Conn).CloseWrite
	c.closeFn = func(bool) { _ = conn.Close() }
	go c.readCapsules(br)
	return nil
}

// readCapsules delivers the DATAGRAM capsules of r and skips other types.
func (c *ConnectUDPConn) readCapsules(r io.Reader) {
	defer c.end(io.EOF)
	cp := http3.NewCapsuleParser(r)
	for {
		typ, cr, err := cp.Next()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				c.end(err)
			}
			return
		}
		if typ != 0 || cr.Remaining() > 1<<16+8 {
			if err := cr.Discard(); err != nil {
				c.end(err)
				return
			}
			continue
		}
		p := make([]byte, cr.Remaining())
		if _, err := io.ReadFull(cr, p); err != nil {
			c.end(err)
			return
		}
		c.deliver(p)
	}
}

// deliver queues an HTTP Datagram payload of context ID 0; others are dropped.
func (c *ConnectUDPConn) deliver(p []byte) {
	id, n, err := quicvarint.Parse(p)
	if err != nil || id != 0 {
		c.dropped.Add(1)
		return
	}
	select {
	case c.in <- p[n:]:
	default:
		c.dropped.Add(1)
	}
}

func (c *ConnectUDPConn) end(err error) {
	c.err.CompareAndSwap(nil, &err)
	c.once.Do(func() { close(c.errc) })
}

// Dropped counts received datagrams dropped: an unknown context ID, or the
// queue was full.
func (c *ConnectUDPConn) Dropped() int64 { return c.dropped.Load() }

// ReadDatagram returns the next UDP payload from the target. After the flow
// ended, it returns what is queued, then the error that ended it (io.EOF for a
// clean end).
func (c *ConnectUDPConn) ReadDatagram(ctx context.Context) ([]byte, error) {
	select {
	case p := <-c.in:
		return p, nil
	default:
	}
	select {
	case p := <-c.in:
		return p, nil
	case <-c.errc:
		select {
		case p := <-c.in:
			return p, nil
		default:
		}
		return nil, *c.err.Load()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// WriteDatagram sends one UDP payload to the target: as an HTTP/3 datagram
// when the flow has them (one that fits no QUIC DATAGRAM frame goes as a
// capsule), else as a DATAGRAM capsule.
func (c *ConnectUDPConn) WriteDatagram(p []byte) error {
	return c.WriteContextDatagram(0, p)
}

// WriteContextDatagram sends an HTTP Datagram with context ID id (RFC 9298
// §4); only 0 (a UDP payload) is defined by RFC 9298.
func (c *ConnectUDPConn) WriteContextDatagram(id uint64, p []byte) error {
	b := quicvarint.Append(make([]byte, 0, len(p)+8), id)
	b = append(b, p...)
	if c.dg != nil {
		err := c.dg.SendDatagram(b)
		if err == nil || !errors.As(err, new(*quic.DatagramTooLargeError)) {
			return err
		}
	}
	return c.WriteCapsule(0, b)
}

// WriteCapsule writes one capsule of type typ with payload p on the request
// stream (RFC 9297 §3.2), e.g. a DATAGRAM capsule (type 0) whose payload is
// a context ID and a UDP payload.
func (c *ConnectUDPConn) WriteCapsule(typ uint64, p []byte) error {
	return c.WriteRaw(quicvarint.Append(quicvarint.Append(nil, typ), uint64(len(p))), p)
}

// WriteRaw writes bytes on the request stream as they are, in one Write.
func (c *ConnectUDPConn) WriteRaw(parts ...[]byte) error {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := c.w.Write(b)
	return err
}

// Done is closed when the flow's stream ended; Err then says why.
func (c *ConnectUDPConn) Done() <-chan struct{} { return c.errc }

// Err is why the flow ended (io.EOF: cleanly), nil while it runs.
func (c *ConnectUDPConn) Err() error {
	if e := c.err.Load(); e != nil {
		return *e
	}
	return nil
}

// Close ends the flow cleanly.
func (c *ConnectUDPConn) Close() error {
	c.closeFn(false)
	return nil
}

// CloseWrite ends the client's direction (h3 FIN, h2 END_STREAM, TLS
// close_notify) and keeps receiving until the proxy ends the flow.
func (c *ConnectUDPConn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.closeW()
}

// Abort ends the flow with a reset.
func (c *ConnectUDPConn) Abort() { c.closeFn(true) }
