package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"
)

var errNoWeb = errors.New("this server only accepts ALPN \"tp/1\"")

// configForClient routes by ALPN: a ClientHello offering "tp/1" gets the proxy
// configuration (TLS 1.3, verified client certificate); anything else the website's.
func (s *Server) configForClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	if slices.Contains(hello.SupportedProtos, ALPN) {
		return s.proxyTLS, nil
	}
	if s.webTLS == nil {
		return nil, errNoWeb
	}
	return s.webTLS, nil
}

// handle owns one accepted connection: handshake, then proxy session or hand-off
// to the website.
func (s *Server) handle(ctx context.Context, raw net.Conn) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(s.force, cancel)
	defer stop()

	conn := tls.Server(raw, s.tls)
	hctx, hcancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	err := conn.HandshakeContext(hctx)
	hcancel()
	if err != nil {
		s.release()
		_ = raw.Close()
		s.log.LogAttrs(ctx, slog.LevelInfo, "tls handshake failed",
			slog.String("remote", raw.RemoteAddr().String()), slog.String("err", err.Error()))
		return
	}
	switch proto := conn.ConnectionState().NegotiatedProtocol; proto {
	case ALPN:
		defer s.release()
		s.serveProxy(ctx, conn)
	case "", "h2", "http/1.1":
		if s.web == nil { // unreachable: configForClient refuses non-tp handshakes
			s.release()
			_ = conn.Close()
			return
		}
		s.web.handoff(conn) // http.Server now owns conn and its MaxConns slot
	default: // e.g. acme-tls/1: the handshake itself was the whole exchange
		s.release()
		_ = conn.Close()
	}
}

// webServer runs an http.Server over connections that were already handshaken by
// the shared listener. http.Server recognises *tls.Conn and dispatches "h2" to its
// built-in HTTP/2 server through TLSNextProto, so both protocols work.
type webServer struct {
	srv     *http.Server
	ln      *chanListener
	once    sync.Once
	release func()
}

func newWebServer(h http.Handler, log *slog.Logger, release func()) *webServer {
	w := &webServer{ln: newChanListener(), release: release}
	w.srv = &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateClosed || st == http.StateHijacked {
				release()
			}
		},
	}
	return w
}

func (w *webServer) start() {
	w.once.Do(func() { go func() { _ = w.srv.Serve(w.ln) }() })
}

func (w *webServer) handoff(c *tls.Conn) {
	if !w.ln.put(c) {
		_ = c.Close()
		w.release()
	}
}

func (w *webServer) shutdown(ctx context.Context) error {
	w.ln.Close()
	err := w.srv.Shutdown(ctx)
	if err != nil {
		_ = w.srv.Close()
	}
	return err
}

// chanListener is a net.Listener fed by handoff.
type chanListener struct {
	ch        chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func newChanListener() *chanListener {
	return &chanListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) put(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return chanAddr{} }

type chanAddr struct{}

func (chanAddr) Network() string { return "tp" }
func (chanAddr) String() string  { return "tp-web" }
