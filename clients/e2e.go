package clients

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// E2EALPN is the ALPN of the inner TLS session between a dialer and a protected
// reverse listener's agent.
const E2EALPN = "tp-e2e/1"

// innerTLS runs the end-to-end TLS session with a protected reverse listener's
// agent inside conn: it verifies the agent's certificate for host against the TP
// root, presents this device's certificate, and reads the agent's own hello.
func (d *Dialer) innerTLS(ctx context.Context, conn net.Conn, addr string) (net.Conn, error) {
	host, _, _ := net.SplitHostPort(addr)
	cfg := d.TLSConfig.Clone()
	cfg.ServerName = host
	cfg.NextProtos = []string{E2EALPN}
	cfg.MinVersion = tls.VersionTLS13
	// EOFConn lets a cut of the inner session (no close_notify) be told from its end.
	batch := &batchConn{Conn: wire.NewEOFConn(conn)}
	tc := tls.Client(batch, cfg)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	err := tc.HandshakeContext(ctx)
	var sh wire.ServerHello
	if err == nil {
		sh, err = wire.ReadServerHello(tc)
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
	return newBatchedTLS(tc, batch), nil
}

// maxBatch bounds what one batch holds before it is written out: four full TLS
// records, what one Write of a bridge's 64 KiB buffer produces.
const maxBatch = 4 * (16384 + 256)

// batchConn sits between an inner TLS session and the relay's stream it runs
// in. crypto/tls writes every record with its own Write, and an inner record
// (16 KiB of data plus 22 bytes of framing and tag) does not fit one record of
// the outer TLS connection: without batching, each inner record became a full
// outer record plus a 22-byte one, doubling records, syscalls and the relay's
// reads and writes. While a batch is open (begin … end, one Write of the inner
// session), records are collected and written with one Write of the stream.
// Writes from elsewhere (an alert sent by a Read) wait for an open batch, so the
// order of records never changes.
type batchConn struct {
	net.Conn
	mu   sync.Mutex
	open int // batches open; while > 0, records are collected in buf
	buf  []byte
	err  error // the stream's write error, once there is one
}

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return 0, b.err
	}
	if b.open == 0 {
		return b.Conn.Write(p)
	}
	b.buf = append(b.buf, p...)
	if len(b.buf) >= maxBatch {
		return len(p), b.flushLocked()
	}
	return len(p), nil
}

// Unwrap is the stream below.
func (b *batchConn) Unwrap() net.Conn { return b.Conn }

func (b *batchConn) begin() {
	b.mu.Lock()
	b.open++
	b.mu.Unlock()
}

// end closes a batch; the last open batch writes what was collected.
func (b *batchConn) end() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.open--
	if b.open > 0 {
		return nil
	}
	return b.flushLocked()
}

func (b *batchConn) flushLocked() error {
	if len(b.buf) == 0 || b.err != nil {
		b.buf = b.buf[:0]
		return b.err
	}
	_, err := b.Conn.Write(b.buf)
	b.buf = b.buf[:0]
	if err != nil {
		b.err = err
	}
	return err
}

// batchedTLS is an inner TLS session whose Writes reach the stream in one piece.
type batchedTLS struct {
	*tls.Conn
	raw *batchConn
}

func newBatchedTLS(tc *tls.Conn, raw *batchConn) *batchedTLS { return &batchedTLS{Conn: tc, raw: raw} }

// Unwrap is the TLS connection.
func (c *batchedTLS) Unwrap() net.Conn { return c.Conn }

func (c *batchedTLS) Write(p []byte) (int, error) {
	c.raw.begin()
	n, err := c.Conn.Write(p)
	if ferr := c.raw.end(); err == nil && ferr != nil {
		err = ferr
	}
	return n, err
}
