package carrier

// The stream carriers' server ends: a TLS connection that negotiated
// "tp-carrier/1" on the shared port (ServeTLS), and a WebSocket at
// wire.CarrierWSPath on the website side (ServeWS).

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

// ServeTLS serves one TLS connection that negotiated "tp-carrier/1"; its
// handshake verified the certificate of device. An error means the mux
// refused the session, and conn is the caller's to close.
func (m *Mux) ServeTLS(ctx context.Context, conn *tls.Conn, device string) error {
	link := &tlsLink{conn: conn, idle: m.opts.Idle, w: bufio.NewWriterSize(conn, 64<<10), wbuf: make([]byte, 2+wire.MaxCarrierPacket)}
	return m.serveCarrier(ctx, wire.CarrierTLS, conn.RemoteAddr().String(), device, link)
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

// ServeWS upgrades a request at wire.CarrierWSPath to the ws carrier and
// serves it until ctx ends or the session does; ctx is the session's, not the
// request's. The upgrade needs nothing but the path: the QUIC handshake it
// carries needs the device certificate. The session counts against
// Options.MaxSessions.
func (m *Mux) ServeWS(ctx context.Context, w http.ResponseWriter, r *http.Request) {
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
	if err := m.serveCarrier(ctx, wire.CarrierWS, r.RemoteAddr, "", &wsLink{c: c, idle: m.opts.Idle}); err != nil {
		_ = c.Close(websocket.StatusTryAgainLater, "too many carrier sessions")
	}
}

var _ carrierLink = (*tlsLink)(nil)
var _ carrierLink = (*wsLink)(nil)
var _ net.PacketConn = (*Mux)(nil)
