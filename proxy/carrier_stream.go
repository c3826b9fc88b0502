package proxy

// The stream carriers' server ends: a TLS connection that negotiated
// "tp-carrier/1" on the shared port (handle, demux.go), and a WebSocket at
// wire.CarrierWSPath on the website side (carrierRoutes).

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/tp-proxy/tp/proxy/wire"
)

// carrierWriteTimeout bounds one packet's write to a carrier connection: a
// client that stops reading loses its carrier, not the server's memory.
const carrierWriteTimeout = 10 * time.Second

// tlsLink is the tls carrier over one TLS connection.
type tlsLink struct {
	conn *tls.Conn
	idle time.Duration
	w    *bufio.Writer // the writer goroutine's only; flushed when its queue is empty
	wbuf []byte
	once sync.Once
}

func (l *tlsLink) readPacket(_ context.Context, b []byte) (int, error) {
	_ = l.conn.SetReadDeadline(time.Now().Add(l.idle))
	return wire.ReadCarrierFrame(l.conn, b)
}

func (l *tlsLink) writePacket(_ context.Context, b []byte) error {
	_ = l.conn.SetWriteDeadline(time.Now().Add(carrierWriteTimeout))
	return wire.WriteCarrierFrame(l.w, b, l.wbuf)
}

func (l *tlsLink) flush() error { return l.w.Flush() }

func (l *tlsLink) close() { l.once.Do(func() { _ = l.conn.Close() }) }

// carrierDevice is the device a tp-carrier/1 connection's handshake proved.
func (s *Server) carrierDevice(conn *tls.Conn) string {
	cs := conn.ConnectionState()
	id, _ := s.connIdentity(&cs)
	if id == "" {
		id = "?" // verified by the handshake, whatever its name says
	}
	return id
}

// serveCarrierTLS serves one TLS connection that negotiated "tp-carrier/1"; its
// handshake verified the device certificate like "tp/1".
func (s *Server) serveCarrierTLS(ctx context.Context, conn *tls.Conn) {
	m := s.carrierMux()
	if m == nil {
		s.log.Warn("carrier connection refused: QUIC is not served", "remote", conn.RemoteAddr().String())
		_ = conn.Close()
		return
	}
	link := &tlsLink{conn: conn, idle: m.opts.Idle, w: bufio.NewWriterSize(conn, 64<<10), wbuf: make([]byte, 2+wire.MaxCarrierPacket)}
	if err := m.serveCarrier(ctx, wire.CarrierTLS, conn.RemoteAddr().String(), s.carrierDevice(conn), link); err != nil {
		s.log.Warn("carrier connection refused", "carrier", wire.CarrierTLS, "remote", conn.RemoteAddr().String(), "err", err)
		_ = conn.Close()
	}
}

// wsLink is the ws carrier over one WebSocket: one binary message per packet.
type wsLink struct {
	c    *websocket.Conn
	idle time.Duration
}

func (l *wsLink) readPacket(ctx context.Context, b []byte) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, l.idle)
	defer cancel()
	typ, r, err := l.c.Reader(ctx)
	if err != nil {
		return 0, err
	}
	if typ != websocket.MessageBinary {
		return 0, wire.ErrCarrierFrame
	}
	return wire.ReadCarrierMessage(r, b)
}

func (l *wsLink) writePacket(ctx context.Context, b []byte) error {
	ctx, cancel := context.WithTimeout(ctx, carrierWriteTimeout)
	defer cancel()
	return l.c.Write(ctx, websocket.MessageBinary, b)
}

func (l *wsLink) flush() error { return nil }
func (l *wsLink) close()       { _ = l.c.CloseNow() }

// carrierRoutes puts the carriers' HTTP endpoints in front of the website's
// handler web.
func (s *Server) carrierRoutes(web http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case wire.CarrierWSPath:
			s.serveCarrierWS(w, r)
			return
		case wire.CarrierHTTPPath:
			s.serveCarrierHTTP(w, r)
			return
		}
		web.ServeHTTP(w, r)
	})
}

// serveCarrierWS upgrades a request at wire.CarrierWSPath to the ws carrier.
// The upgrade needs nothing but the path: the QUIC handshake it carries needs
// the device certificate. The session counts against CarrierOptions.MaxSessions.
func (s *Server) serveCarrierWS(w http.ResponseWriter, r *http.Request) {
	m := s.carrierMux()
	if m == nil {
		http.Error(w, "the ws carrier needs QUIC, which this TP server does not serve", http.StatusServiceUnavailable)
		return
	}
	m.mu.Lock()
	full := len(m.sessions) >= m.opts.MaxSessions
	m.mu.Unlock()
	if full {
		http.Error(w, "too many carrier sessions; try again later", http.StatusServiceUnavailable)
		return
	}
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true}) // no cookies: any origin is as good as another
	if err != nil {
		return // Accept answered the request
	}
	c.SetReadLimit(wire.MaxCarrierPacket)
	// The session ends with its link, with the QUIC server (which closes the
	// mux after its connections drained), or when a shutdown gives up draining.
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	stop := context.AfterFunc(s.force, cancel)
	defer stop()
	if err := m.serveCarrier(ctx, wire.CarrierWS, r.RemoteAddr, "", &wsLink{c: c, idle: m.opts.Idle}); err != nil {
		_ = c.Close(websocket.StatusTryAgainLater, "too many carrier sessions")
	}
}

var _ carrierLink = (*tlsLink)(nil)
var _ carrierLink = (*wsLink)(nil)
var _ net.PacketConn = (*carrierMux)(nil)
