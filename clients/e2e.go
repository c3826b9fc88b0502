package clients

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/tp-proxy/tp/proxy"
)

// E2EALPN is the ALPN of the inner TLS session between a dialer and a protected
// reverse listener's agent.
const E2EALPN = "tp-e2e/1"

// ErrTruncated reports a session that ended without the peer's TLS close_notify:
// the other end went away mid-session, and data may be missing.
var ErrTruncated = errors.New("the session was cut off before its end (no TLS close_notify from the exposed service's agent); data may be missing")

// innerTLS runs the end-to-end TLS session with a protected reverse listener's
// agent inside conn: it verifies the agent's certificate for host against the TP
// root, presents this device's certificate, and reads the agent's own hello.
func (d *Dialer) innerTLS(ctx context.Context, conn net.Conn, addr string) (net.Conn, error) {
	host, _, _ := net.SplitHostPort(addr)
	cfg := d.TLSConfig.Clone()
	cfg.ServerName = host
	cfg.NextProtos = []string{E2EALPN}
	cfg.MinVersion = tls.VersionTLS13
	raw := &eofTracker{Conn: conn}
	tc := tls.Client(raw, cfg)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	err := tc.HandshakeContext(ctx)
	var sh proxy.ServerHello
	if err == nil {
		sh, err = proxy.ReadServerHello(tc)
	}
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		_ = conn.Close()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("tp dial %s: the agent ended the session during its TLS handshake (it probably refused this device's certificate): %w", addr, err)
		}
		return nil, fmt.Errorf("tp dial %s: end-to-end TLS with the agent: %w", addr, err)
	}
	_ = conn.SetDeadline(time.Time{})
	if !sh.OK {
		_ = tc.Close()
		return nil, &RefusedError{Code: sh.Code, Reason: sh.Reason}
	}
	return &e2eConn{Conn: tc, raw: raw}, nil
}

// eofTracker remembers whether the transport under a TLS session reached EOF.
type eofTracker struct {
	net.Conn
	eof bool
}

func (e *eofTracker) Read(p []byte) (int, error) {
	n, err := e.Conn.Read(p)
	if n == 0 && err != nil { // data with io.EOF (QUIC) may still hold a close_notify
		e.eof = true
	}
	return n, err
}

// e2eConn turns an end of the inner TLS session without close_notify into
// ErrTruncated. crypto/tls reports both as io.EOF; a close_notify record makes it
// return before it reads the transport's EOF, so a transport EOF seen means none came.
type e2eConn struct {
	*tls.Conn
	raw *eofTracker
}

func (c *e2eConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if errors.Is(err, io.EOF) && c.raw.eof {
		return n, ErrTruncated
	}
	return n, err
}
