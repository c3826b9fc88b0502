package clients

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// HTTPExposer is `tp expose --http`: it serves a local HTTP app as the reverse
// name Name.<reverse-zone> through reverse tunnels of
// draft-kazuho-httpbis-reverse-tunnel (docs/HTTP.md §2). It holds Tunnels
// tunnels to the TP server's proxy name, each an HTTP/1.1 Upgrade offering h2
// and http/1.1 inside: a tunnel where the server chose h2 carries many
// requests, one where it chose http/1.1 carries one connection and is replaced
// as soon as it is used (the spares keep the name served meanwhile). Every
// request is passed to Local by a reverse proxy. Broken tunnels are reopened
// with backoff.
type HTTPExposer struct {
	// Server is the TP server's host:port, dialed over TCP.
	Server string
	// ProxyName is the server name (SNI) of the TP server's proxy name, the only
	// name where it takes reverse tunnels. Default "proxy.localhost".
	ProxyName string
	// TLSConfig carries RootCAs and the device certificate (Certificates or
	// GetClientCertificate); ServerName and NextProtos are set here.
	TLSConfig *tls.Config
	// Name is the reverse label to serve (NAME of NAME.<reverse-zone>).
	Name string
	// Local is the app's URL, http://127.0.0.1:8080 say.
	Local *url.URL
	// Tunnels is how many tunnels to hold at once (the spares of HTTP/1.1). Default 4.
	Tunnels int
	// H1Only offers only http/1.1 inside the tunnels.
	H1Only bool
	// DevicesOnly asks TP to serve the app to enrolled devices only (their
	// device certificate is required), not to anyone.
	DevicesOnly bool
	// ExitOnRefusal returns the server's refusal (policy, a name another
	// identity holds) instead of retrying with backoff.
	ExitOnRefusal bool
	// Logger receives a line per tunnel problem. Default slog.Default().
	Logger *slog.Logger
	// Established is called with the protocol chosen inside each new tunnel.
	Established func(selected string)
}

// ErrTunnelRefused is wrapped by the server's refusal of a tunnel request.
var ErrTunnelRefused = errors.New("the TP server refused the reverse tunnel")

// maxRefusalBody bounds the refusal text read from the server.
const maxRefusalBody = 4 << 10

// Run holds the tunnels until ctx ends, or until the server refuses one and
// ExitOnRefusal is set.
func (x *HTTPExposer) Run(ctx context.Context) error {
	if x.Local == nil || x.Local.Scheme != "http" && x.Local.Scheme != "https" || x.Local.Host == "" {
		return errors.New("tp expose --http: LOCAL-URL must be an http:// or https:// URL, e.g. http://127.0.0.1:8080")
	}
	n := x.Tunnels
	if n <= 0 {
		n = 4
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	proxy := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(x.Local)
			r.Out.Host = r.In.Host // the app sees the name it is served as
			// Rewrite drops X-Forwarded-*; these came from TP, which set them
			// for the browser's request (replacing any the browser sent), so the
			// app still learns the client's address and that it used https.
			for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
				if v, ok := r.In.Header[h]; ok {
					r.Out.Header[h] = v
				}
			}
		},
		ErrorLog: slog.NewLogLogger(x.log().Handler(), slog.LevelWarn),
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := x.hold(ctx, i, proxy); err != nil {
				cancel(err)
			}
		}()
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

func (x *HTTPExposer) log() *slog.Logger {
	if x.Logger != nil {
		return x.Logger
	}
	return slog.Default()
}

// hold keeps one tunnel open, reopening it after each use or break.
func (x *HTTPExposer) hold(ctx context.Context, slot int, h http.Handler) error {
	backoff := time.Second
	for ctx.Err() == nil {
		conn, selected, err := x.open(ctx)
		if err != nil {
			if errors.Is(err, ErrTunnelRefused) && x.ExitOnRefusal {
				return err
			}
			if ctx.Err() == nil {
				x.log().Warn("tp expose --http: reverse tunnel failed; retrying", "name", x.Name, "slot", slot, "in", backoff, "err", err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 30*time.Second)
			continue
		}
		if x.Established != nil {
			x.Established(selected)
		}
		start := time.Now()
		var used atomic.Bool
		serveTunnel(ctx, conn, selected, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			used.Store(true)
			h.ServeHTTP(w, r)
		}))
		if !used.Load() && time.Since(start) < time.Second {
			// A tunnel that ends at once unused (a server that closes it, a
			// proxy on the way) must not make this loop spin: wait as after a
			// failure. A used HTTP/1.1 tunnel is replaced at once.
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 30*time.Second)
			continue
		}
		backoff = time.Second
	}
	return nil
}

// open dials the proxy name and asks for a tunnel (the draft's HTTP/1.1
// Upgrade). It returns the tunnel and the protocol the server chose inside.
func (x *HTTPExposer) open(ctx context.Context) (net.Conn, string, error) {
	name := x.ProxyName
	if name == "" {
		name = "proxy.localhost"
	}
	cfg := x.TLSConfig.Clone()
	cfg.ServerName, cfg.NextProtos, cfg.MinVersion = name, []string{"http/1.1"}, tls.VersionTLS13
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	c, err := (&tls.Dialer{Config: cfg}).DialContext(dctx, "tcp", x.Server)
	if err != nil {
		return nil, "", fmt.Errorf("connecting to %s (proxy name %s): %w", x.Server, name, err)
	}
	stop := context.AfterFunc(dctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	alpn := "h2, http%2F1.1"
	if x.H1Only {
		alpn = "http%2F1.1"
	}
	req := "GET /.well-known/tp/reverse-http/" + x.Name + " HTTP/1.1\r\nHost: " + name +
		"\r\nConnection: upgrade\r\nUpgrade: reverse\r\nALPN: " + alpn + "\r\n"
	if x.DevicesOnly {
		req += "TP-Access: devices\r\n"
	}
	req += "\r\n"
	if _, err := io.WriteString(c, req); err != nil {
		_ = c.Close()
		return nil, "", fmt.Errorf("asking %s for a reverse tunnel: %w", x.Server, err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		_ = c.Close()
		return nil, "", fmt.Errorf("reading the reverse tunnel response from %s: %w", x.Server, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, maxRefusalBody))
		_ = c.Close()
		return nil, "", fmt.Errorf("%w for %s: %s: %s", ErrTunnelRefused, x.Name, resp.Status, strings.TrimSpace(string(body)))
	}
	selected := resp.Header.Get("Selected-ALPN")
	switch selected {
	case "h2":
	case "http%2F1.1", "http%2f1.1":
		selected = "http/1.1"
	default:
		_ = c.Close()
		return nil, "", fmt.Errorf("the TP server chose %q inside the tunnel, which tp did not offer", selected)
	}
	if !stop() {
		_ = c.Close()
		return nil, "", ctx.Err()
	}
	_ = c.SetDeadline(time.Time{})
	return &bufferedConn{Conn: c, br: br}, selected, nil
}

// bufferedConn reads what the response parser buffered first.
type bufferedConn struct {
	net.Conn
	br *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.br.Read(p) }

// serveTunnel serves HTTP on the tunnel until it closes or ctx ends.
func serveTunnel(ctx context.Context, conn net.Conn, selected string, h http.Handler) {
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	if selected == "h2" {
		(&http2.Server{IdleTimeout: 0}).ServeConn(conn, &http2.ServeConnOpts{Context: ctx, Handler: h})
		_ = conn.Close()
		return
	}
	ln := &singleConn{c: conn, done: make(chan struct{})}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 0, // TP sends the request when a client asks
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateClosed || st == http.StateHijacked {
				_ = ln.Close()
			}
		},
	}
	_ = srv.Serve(ln)
}

// singleConn is a listener that yields one connection, and closes when it ends.
type singleConn struct {
	mu   sync.Mutex
	c    net.Conn
	once sync.Once
	done chan struct{}
}

func (l *singleConn) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.c
	l.c = nil
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *singleConn) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *singleConn) Addr() net.Addr { return &net.TCPAddr{} }
