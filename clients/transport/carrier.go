package transport

// Carriers (docs/PROTOCOL.md, "Carriers"): a client's QUIC connection runs
// over a net.PacketConn, which is a UDP socket (carrier "udp") or a
// CarrierConn that moves each QUIC packet over a stream the network lets
// through: a TLS connection with ALPN "tp-carrier/1" (carrier "tls") or a
// WebSocket on the server's website side (carrier "ws"), or HTTPS polling
// (carrier "http", carrier_http.go). The QUIC connection
// above knows nothing of it. When the stream breaks, CarrierConn opens another
// one; the server sees the client's packets come from a new address and QUIC
// migrates the connection to it, so the connection and its streams live on.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/net/http/httpproxy"

	"github.com/tp-proxy/tp/proxy/wire"
)

// CarrierDialer opens links of the stream carriers to one TP server.
type CarrierDialer struct {
	// Server is the TP server's host:port.
	Server string
	// TLSConfig is the caller's TLS configuration (Config makes the session's).
	TLSConfig *tls.Config
	// Proxy, when set, replaces HTTPS_PROXY/https_proxy and NO_PROXY as the
	// HTTP proxy the tls and ws carriers connect through (CONNECT); it
	// returns nil for a direct connection.
	Proxy func(target *url.URL) (*url.URL, error)
	// HTTPURL, when set, is the http carrier's endpoint instead of
	// https://Server/.well-known/tp-carrier/http.
	HTTPURL string
}

func (d CarrierDialer) tlsConfig() (*tls.Config, error) { return Config(d.Server, d.TLSConfig) }

// Kind is the carrier c runs on.
func (c *CarrierConn) Kind() string { return c.kind }

// ServerAddr is the server's address on c's carrier, as quic-go sees it.
func (c *CarrierConn) ServerAddr() net.Addr { return c.raddr }

// Refused is closed when a link ends before any packet came in: the server
// took the carrier connection but serves no QUIC behind it.
func (c *CarrierConn) Refused() <-chan struct{} { return c.refused }

// Links is how many links c opened (1 + reconnects).
func (c *CarrierConn) Links() int64 { return c.links.Load() }

// BreakLink closes c's current link, as a proxy that cuts long connections
// would; c opens another one.
func (c *CarrierConn) BreakLink() {
	c.mu.Lock()
	link := c.link
	c.mu.Unlock()
	if link != nil {
		_ = link.Close()
	}
}

// CarrierLink is one stream that carries QUIC packets.
type CarrierLink interface {
	ReadPacket(b []byte) (int, error)
	// WritePacket queues b; Flush sends what was queued.
	WritePacket(b []byte) error
	Flush() error
	Close() error
}

// carrierAddr is the server's address on a carrier, as quic-go sees it.
type carrierAddr struct{ kind, server string }

func (a carrierAddr) Network() string { return "tp-" + a.kind }
func (a carrierAddr) String() string  { return a.kind + "://" + a.server }

// CarrierConn is a net.PacketConn whose packets go over a CarrierLink, opened
// again (after a pause that grows to 5 s) whenever it breaks, until Close.
type CarrierConn struct {
	kind  string
	raddr carrierAddr
	dial  func(ctx context.Context) (CarrierLink, error)
	in    chan []byte   // packets from the server, bounded
	out   chan []byte   // packets to the server, bounded; the writer drains it
	done  chan struct{} // closed by Close

	mu        sync.Mutex
	link      CarrierLink
	redialing bool
	closed    bool
	rdl       time.Time
	wake      chan struct{}

	lastRecv atomic.Int64 // unix nanoseconds
	lastSend atomic.Int64
	links    atomic.Int64 // links opened, for tests
	pending  atomic.Int64 // packets queued and not yet written (or lost)
	received atomic.Bool  // a packet ever came in
	// refused is closed when a link ends before any packet came in: the
	// server took the carrier connection but serves no QUIC behind it.
	refused     chan struct{}
	refusedOnce sync.Once
}

// carrierCloseFlush bounds how long Close waits for the packets queued before
// it (quic-go's CONNECTION_CLOSE) to be written: without them, the server
// keeps the connection and the sessions on it (a destination's TCP
// connection) until its idle timeout, 60 s.
const carrierCloseFlush = time.Second

const carrierQueue = 256

// NewCarrierConn opens the first link with ctx and returns the conn.
func NewCarrierConn(ctx context.Context, kind, server string, dial func(context.Context) (CarrierLink, error)) (*CarrierConn, error) {
	link, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	c := &CarrierConn{
		kind:  kind,
		raddr: carrierAddr{kind, server},
		dial:  dial,
		in:    make(chan []byte, carrierQueue),
		out:   make(chan []byte, carrierQueue),
		done:  make(chan struct{}),
		wake:  make(chan struct{}),

		refused: make(chan struct{}),
	}
	c.lastRecv.Store(time.Now().UnixNano())
	c.setLink(link)
	go c.writer()
	return c, nil
}

func (c *CarrierConn) setLink(link CarrierLink) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		_ = link.Close()
		return
	}
	c.link = link
	c.mu.Unlock()
	c.links.Add(1)
	go c.reader(link)
}

func (c *CarrierConn) reader(link CarrierLink) {
	for {
		b := make([]byte, wire.MaxCarrierPacket)
		n, err := link.ReadPacket(b)
		if err != nil {
			if !c.received.Load() {
				c.refusedOnce.Do(func() { close(c.refused) })
			}
			c.linkDown(link)
			return
		}
		c.received.Store(true)
		c.lastRecv.Store(time.Now().UnixNano())
		select {
		case c.in <- b[:n]:
		default: // quic-go does not keep up: a loss, as on UDP
		}
	}
}

// writer sends the queued packets, a burst at a time, on the current link.
func (c *CarrierConn) writer() {
	for {
		var b []byte
		select {
		case b = <-c.out:
		case <-c.done:
			return
		}
		c.mu.Lock()
		link := c.link
		c.mu.Unlock()
		if link == nil {
			c.pending.Add(-1)
			continue // no link now: the packet is lost, QUIC sends it again
		}
		err, n := link.WritePacket(b), int64(1)
		for err == nil && len(c.out) > 0 {
			err = link.WritePacket(<-c.out)
			n++
		}
		if err == nil {
			err = link.Flush()
		}
		c.pending.Add(-n)
		if err != nil {
			c.linkDown(link)
		}
	}
}

// linkDown forgets a broken link and opens another in the background.
func (c *CarrierConn) linkDown(link CarrierLink) {
	_ = link.Close()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.link != link {
		return
	}
	c.link = nil
	if c.closed || c.redialing {
		return
	}
	c.redialing = true
	go c.redial()
}

func (c *CarrierConn) redial() {
	backoff := 200 * time.Millisecond
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		go func() {
			select {
			case <-c.done:
				cancel()
			case <-ctx.Done():
			}
		}()
		link, err := c.dial(ctx)
		cancel()
		if err == nil {
			c.mu.Lock()
			c.redialing = false
			c.mu.Unlock()
			c.setLink(link)
			return
		}
		select {
		case <-c.done:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (c *CarrierConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		c.mu.Lock()
		dl, wake := c.rdl, c.wake
		c.mu.Unlock()
		var timeout <-chan time.Time
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return 0, nil, os.ErrDeadlineExceeded
			}
			t := time.NewTimer(d)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case p := <-c.in:
			return copy(b, p), c.raddr, nil
		case <-c.done:
			return 0, nil, net.ErrClosed
		case <-wake:
		case <-timeout:
			return 0, nil, os.ErrDeadlineExceeded
		}
	}
}

func (c *CarrierConn) WriteTo(b []byte, _ net.Addr) (int, error) {
	p := make([]byte, len(b))
	copy(p, b)
	c.lastSend.Store(time.Now().UnixNano())
	c.pending.Add(1)
	select {
	case c.out <- p:
		return len(b), nil
	case <-c.done:
		c.pending.Add(-1)
		return 0, net.ErrClosed
	}
}

func (c *CarrierConn) Close() error {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return nil
	}
	// The packets queued before Close go out first, within a bound (for the
	// http carrier: until the requests that carry them are answered).
	deadline := time.Now().Add(carrierCloseFlush)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		link := c.link
		c.mu.Unlock()
		f, ok := link.(interface{ flushed() bool })
		if c.pending.Load() == 0 && (!ok || f.flushed()) {
			break
		}
		time.Sleep(5 * time.Millisecond) // polling the writer's progress, bounded above
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	link := c.link
	c.link = nil
	close(c.done)
	c.mu.Unlock()
	if link != nil {
		_ = link.Close()
	}
	return nil
}

func (c *CarrierConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rdl = t
	close(c.wake)
	c.wake = make(chan struct{})
	return nil
}

func (c *CarrierConn) SetDeadline(t time.Time) error    { return c.SetReadDeadline(t) }
func (c *CarrierConn) SetWriteDeadline(time.Time) error { return nil }

// SetReadBuffer and SetWriteBuffer do nothing (the carrier's queues are
// bounded above); quic-go looks for them and prints a warning without them.
func (c *CarrierConn) SetReadBuffer(int) error  { return nil }
func (c *CarrierConn) SetWriteBuffer(int) error { return nil }
func (c *CarrierConn) LocalAddr() net.Addr      { return carrierAddr{c.kind, "local"} }

// stalled reports whether packets went out during the last d while none came
// back for d: the carrier no longer delivers.
func stalled(lastSend, lastRecv time.Time, d time.Duration) bool {
	return lastSend.After(lastRecv) && time.Since(lastRecv) > d
}

// tlsCarrierLink is the tls carrier: 2-octet length, packet; batched writes.
type tlsCarrierLink struct {
	conn net.Conn
	r    *bufio.Reader
	w    *bufio.Writer
	wbuf []byte
}

func (l *tlsCarrierLink) ReadPacket(b []byte) (int, error) { return wire.ReadCarrierFrame(l.r, b) }
func (l *tlsCarrierLink) WritePacket(b []byte) error {
	_ = l.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	return wire.WriteCarrierFrame(l.w, b, l.wbuf)
}
func (l *tlsCarrierLink) Flush() error { return l.w.Flush() }
func (l *tlsCarrierLink) Close() error { return l.conn.Close() }

// wsCarrierLink is the ws carrier: one binary message per packet.
type wsCarrierLink struct{ c *websocket.Conn }

func (l *wsCarrierLink) ReadPacket(b []byte) (int, error) {
	typ, r, err := l.c.Reader(context.Background())
	if err != nil {
		return 0, err
	}
	if typ != websocket.MessageBinary {
		return 0, wire.ErrCarrierFrame
	}
	return wire.ReadCarrierMessage(r, b)
}

func (l *wsCarrierLink) WritePacket(b []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return l.c.Write(ctx, websocket.MessageBinary, b)
}
func (l *wsCarrierLink) Flush() error { return nil }
func (l *wsCarrierLink) Close() error { return l.c.CloseNow() }

// carrierProxy is the HTTP proxy for a carrier's connection to target:
// Dialer.CarrierProxy, or HTTPS_PROXY/https_proxy and NO_PROXY, read now.
func (d CarrierDialer) carrierProxy(target *url.URL) (*url.URL, error) {
	if d.Proxy != nil {
		return d.Proxy(target)
	}
	return httpproxy.FromEnvironment().ProxyFunc()(target)
}

// dialCarrierTCP connects to the server's TCP port, through the HTTP proxy's
// CONNECT when there is one.
func (d CarrierDialer) dialCarrierTCP(ctx context.Context) (net.Conn, error) {
	proxyURL, err := d.carrierProxy(&url.URL{Scheme: "https", Host: d.Server})
	if err != nil {
		return nil, fmt.Errorf("the HTTPS_PROXY setting: %w", err)
	}
	var nd net.Dialer
	if proxyURL == nil {
		return nd.DialContext(ctx, "tcp", d.Server)
	}
	return connectThrough(ctx, proxyURL, d.Server)
}

// connectThrough opens a tunnel to target through the HTTP proxy at proxyURL
// (http:// or https://) with CONNECT.
func connectThrough(ctx context.Context, proxyURL *url.URL, target string) (net.Conn, error) {
	host := proxyURL.Host
	if proxyURL.Port() == "" {
		port := "80"
		if proxyURL.Scheme == "https" {
			port = "443"
		}
		host = net.JoinHostPort(proxyURL.Hostname(), port)
	}
	var nd net.Dialer
	raw, err := nd.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, fmt.Errorf("connecting to the HTTP proxy %s: %w", host, err)
	}
	conn := raw
	if proxyURL.Scheme == "https" {
		tc := tls.Client(raw, &tls.Config{ServerName: proxyURL.Hostname()})
		if err := tc.HandshakeContext(ctx); err != nil {
			_ = raw.Close()
			return nil, fmt.Errorf("TLS with the HTTP proxy %s: %w", host, err)
		}
		conn = tc
	}
	stop := context.AfterFunc(ctx, func() { _ = raw.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if u := proxyURL.User; u != nil {
		pw, _ := u.Password()
		req += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+pw)) + "\r\n"
	}
	if _, err := io.WriteString(conn, req+"\r\n"); err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("CONNECT through the HTTP proxy %s: %w", host, err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("CONNECT through the HTTP proxy %s: %w", host, err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_ = raw.Close()
		return nil, fmt.Errorf("the HTTP proxy %s refused CONNECT to %s: %s", host, target, resp.Status)
	}
	_ = raw.SetDeadline(time.Time{})
	if br.Buffered() > 0 { // the server spoke first (it does not in TLS, but be exact)
		return &bufConn{Conn: conn, r: br}, nil
	}
	return conn, nil
}

type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// dialTLSCarrier opens a tls carrier link: TLS 1.3, ALPN "tp-carrier/1", the
// device certificate (the server asks for it as for "tp/1").
func (d CarrierDialer) dialTLSCarrier(ctx context.Context) (CarrierLink, error) {
	cfg, err := d.tlsConfig()
	if err != nil {
		return nil, err
	}
	cfg.NextProtos = []string{wire.ALPNCarrier}
	raw, err := d.dialCarrierTCP(ctx)
	if err != nil {
		return nil, fmt.Errorf("connecting to TP server %s for the tls carrier: %w", d.Server, err)
	}
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("TLS handshake with TP server %s for the tls carrier: %w", d.Server, err)
	}
	if conn.ConnectionState().NegotiatedProtocol != wire.ALPNCarrier {
		_ = conn.Close()
		return nil, fmt.Errorf("TP server %s does not offer the tls carrier (it did not accept ALPN %q); use --carrier udp or ws", d.Server, wire.ALPNCarrier)
	}
	return &tlsCarrierLink{conn: conn, r: bufio.NewReaderSize(conn, 32<<10), w: bufio.NewWriterSize(conn, 64<<10), wbuf: make([]byte, 2+wire.MaxCarrierPacket)}, nil
}

// carrierWebTLS is the TLS configuration of the web carriers' HTTPS: the
// server's certificate is accepted if the system's roots or the Dialer's
// (TP's CA) vouch for it, since the website may have a public certificate and
// a TLS-inspecting proxy its own; the QUIC handshake inside verifies TP's
// certificate whatever carries it. The device certificate is offered, for
// the proxy names, which ask for it.
func (d CarrierDialer) carrierWebTLS() (*tls.Config, error) {
	base, err := d.tlsConfig()
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{
		MinVersion:           tls.VersionTLS12,
		ServerName:           base.ServerName,
		Certificates:         base.Certificates,
		GetClientCertificate: base.GetClientCertificate,
		NextProtos:           []string{"http/1.1"},
		InsecureSkipVerify:   true, // verified in VerifyConnection, against two sets of roots
	}
	roots := base.RootCAs
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("the server sent no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		opts := x509.VerifyOptions{DNSName: cs.ServerName, Intermediates: inter}
		_, err := cs.PeerCertificates[0].Verify(opts)
		if err == nil || roots == nil {
			return err
		}
		opts.Roots = roots
		_, err = cs.PeerCertificates[0].Verify(opts)
		return err
	}
	return cfg, nil
}

// dialWSCarrier opens a ws carrier link at wss://Server/.well-known/tp-carrier/ws,
// through the HTTPS proxy (CONNECT) when there is one.
func (d CarrierDialer) dialWSCarrier(ctx context.Context) (CarrierLink, error) {
	cfg, err := d.carrierWebTLS()
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{
		Proxy:                  func(r *http.Request) (*url.URL, error) { return d.carrierProxy(r.URL) },
		TLSClientConfig:        cfg,
		MaxResponseHeaderBytes: 16 << 10,
	}
	defer tr.CloseIdleConnections()
	u := "https://" + d.Server + wire.CarrierWSPath
	c, resp, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}})
	if err != nil {
		if resp != nil && resp.StatusCode == http.StatusNotFound {
			return nil, fmt.Errorf("TP server %s does not offer the ws carrier (404 at %s); use --carrier udp or tls", d.Server, wire.CarrierWSPath)
		}
		return nil, fmt.Errorf("connecting to TP server %s for the ws carrier: %w", d.Server, err)
	}
	c.SetReadLimit(wire.MaxCarrierPacket)
	return &wsCarrierLink{c: c}, nil
}

// Dial returns how to open links of the named carrier.
func (d CarrierDialer) Dial(kind string) (func(context.Context) (CarrierLink, error), error) {
	switch kind {
	case wire.CarrierTLS:
		return d.dialTLSCarrier, nil
	case wire.CarrierWS:
		return d.dialWSCarrier, nil
	case wire.CarrierHTTP:
		return d.dialHTTPCarrier, nil
	default:
		return nil, fmt.Errorf("carrier %q must be auto, udp, tls, ws or http", kind)
	}
}
