package proxy

// The HTTPS proxy for standard clients on the proxy names (Config.ProxyNames):
// a ClientHello that does not offer "tp/1" and names a proxy name gets
// connectTLS (demux.go), which requires and verifies the device certificate
// exactly as the "tp/1" configuration does, and its connection is served here
// by an http.Server (HTTP/1.1 and h2) or an http3.Server (h3, quic.go) whose
// handler is routeProxyHTTP. The website's names never ask for a certificate.

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Bounds of the proxy's HTTP servers. A CONNECT request is one line and a few
// headers: 16 KiB is generous, and keeps what an authenticated client can make
// the server hold per request small.
const (
	proxyMaxHeaderBytes = 16 << 10
	proxyIdleTimeout    = 2 * time.Minute
)

// isProxyName reports whether serverName (SNI) is one of Config.ProxyNames.
func (s *Server) isProxyName(serverName string) bool {
	if s.cfg.ProxyNames == nil || serverName == "" {
		return false
	}
	return s.cfg.ProxyNames(strings.TrimSuffix(strings.ToLower(serverName), "."))
}

// routeProxyHTTP is the handler of every request on a proxy name: CONNECT
// (without :protocol) is the CONNECT proxy, a request for a reverse tunnel goes
// to ServeReverseTunnel, anything else to Config.ProxyHTTP (404 when unset).
func (s *Server) routeProxyHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == wire.CarrierWSPath: // the ws carrier (carrier.go)
		s.serveCarrierWS(w, r)
	case r.URL.Path == wire.CarrierHTTPPath: // the http carrier (carrier.go)
		s.serveCarrierHTTP(w, r)
	case reverse.IsReverseTunnel(r):
		s.ServeReverseTunnel(w, r)
	case r.Method == http.MethodConnect && connectProtocol(r) == "":
		s.serveConnectHTTP(w, r)
	case isConnectUDP(r): // CONNECT-UDP, RFC 9298 (masque_udp.go)
		s.serveConnectUDPHTTP(w, r)
	case isConnectIP(r): // CONNECT-IP, RFC 9484 (connectip.go)
		s.serveConnectIP(w, r)
	case r.Method == http.MethodConnect: // extended CONNECT for a protocol TP does not serve
		proxyRefusal(w, r, http.StatusNotImplemented, "http_request_error", "TP serves no extended CONNECT for :protocol "+connectProtocol(r))
	case s.cfg.ProxyHTTP != nil:
		s.cfg.ProxyHTTP.ServeHTTP(w, r)
	default:
		http.NotFound(w, r)
	}
}

// connectProtocol is the :protocol of an extended CONNECT (RFC 8441, RFC 9220),
// "" for a plain CONNECT. Go's HTTP/2 server gives it as the ":protocol" header,
// quic-go's HTTP/3 server as Proto.
func connectProtocol(r *http.Request) string {
	if p := r.Header.Get(":protocol"); p != "" {
		return p
	}
	if r.ProtoMajor == 3 && r.Proto != "HTTP/3.0" {
		return r.Proto
	}
	return ""
}

// proxyHTTP serves the proxy names' connections after their handshake: h1 and
// h2 on TCP through srv, h3 on QUIC through h3. Connections count against
// Config.MaxConns (the proxy's budget, not the website's): a connection's slot
// is given back when srv reports it closed or hijacked, and each CONNECT tunnel
// holds a slot of its own while it lives (httpconnect.go).
type proxyHTTP struct {
	srv  *http.Server
	h3   *h3Server
	ln   *chanListener
	once sync.Once
}

func newProxyHTTP(s *Server) *proxyHTTP {
	p := &proxyHTTP{ln: newChanListener()}
	h := http.HandlerFunc(s.routeProxyHTTP)
	errLog := slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)
	p.srv = &http.Server{
		Handler:           h,
		ReadHeaderTimeout: s.cfg.HelloTimeout,
		IdleTimeout:       proxyIdleTimeout,
		MaxHeaderBytes:    proxyMaxHeaderBytes,
		ErrorLog:          errLog,
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams: 250,
			// A CONNECT stream carries bulk data: a window of 4 MiB per stream
			// keeps a long fat path full; the connection's bounds the sum.
			MaxReceiveBufferPerStream:     4 << 20,
			MaxReceiveBufferPerConnection: 16 << 20,
			// Larger frames from clients that take the offer: fewer frames
			// (and scheduler rounds) per megabyte.
			MaxReadFrameSize: 256 << 10,
		},
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateClosed || st == http.StateHijacked {
				s.release()
			}
		},
		// An h2 client that cancels its CONNECTs before their answers (rapid
		// reset) loses its connection (flood.go).
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, floodKey{}, newCancelFlood(func() {
				s.log.Warn("CONNECT connection closed: its client cancelled more requests before their answer than it let be answered (rapid reset)",
					"remote", c.RemoteAddr().String())
				_ = c.Close()
			}))
		},
	}
	p.h3 = newH3Server(&http3.Server{
		ConnContext: func(ctx context.Context, c *quic.Conn) context.Context {
			ctx = p.h3.own.connContext(ctx, c)
			return context.WithValue(ctx, floodKey{}, newCancelFlood(func() {
				s.log.Warn("CONNECT connection closed: its client cancelled more requests before their answer than it let be answered (rapid reset)",
					"remote", c.RemoteAddr().String())
				_ = c.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeExcessiveLoad), "too many requests cancelled before their answer")
			}))
		},
		Handler:        h,
		MaxHeaderBytes: proxyMaxHeaderBytes,
		IdleTimeout:    proxyIdleTimeout,
		Logger:         s.log,
		// HTTP Datagrams (RFC 9297) for the MASQUE protocols; the QUIC
		// listener enables QUIC datagrams already (quic.go).
		EnableDatagrams: true,
	})
	p.h3.own = newH3Own()
	return p
}

func (p *proxyHTTP) start() {
	p.once.Do(func() { go func() { _ = p.srv.Serve(p.ln) }() })
}

// handoff gives srv a handshaken connection; false when it is shutting down
// (the caller then closes it and gives its slot back).
func (p *proxyHTTP) handoff(c *tls.Conn) bool {
	p.start()
	return p.ln.put(c)
}

func (p *proxyHTTP) shutdown(ctx context.Context) error { return shutdownHTTP(ctx, p.ln, p.srv, p.h3) }

// handoffProxyHTTP gives a handshaken connection on a proxy name to the proxy's
// HTTP server, which now owns it and its MaxConns slot. Its certificate was
// verified by connectTLS; a connection without one never gets here.
func (s *Server) handoffProxyHTTP(conn *tls.Conn) {
	if len(conn.ConnectionState().VerifiedChains) == 0 || !s.connect.handoff(conn) {
		s.release()
		_ = conn.Close()
	}
}
