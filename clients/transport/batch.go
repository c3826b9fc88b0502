package transport

import (
	"crypto/tls"
	"net"
	"sync"
)

// MaxBatch bounds what one batch holds before it is written out: four full TLS
// records, what one Write of a bridge's 64 KiB buffer produces.
const MaxBatch = 4 * (16384 + 256)

// BatchConn sits between a TLS session and the stream it runs over (a TCP
// connection, or a relay's stream for an end-to-end session). crypto/tls
// writes every record with its own Write: without batching, a session's
// Write of 64 KiB is four writes of the stream (and an inner record, 16 KiB
// of data plus 22 bytes of framing and tag, does not fit one record of an
// outer TLS connection: each became a full outer record plus a 22-byte one,
// doubling records, syscalls and the relay's reads and writes). While a batch
// is open (Begin … End, one Write of the session), records are collected and
// written with one Write of the stream. Writes from elsewhere (an alert sent
// by a Read) wait for an open batch, so the order of records never changes.
type BatchConn struct {
	net.Conn
	mu   sync.Mutex
	open int // batches open; while > 0, records are collected in buf
	buf  []byte
	err  error // the stream's write error, once there is one
}

func (b *BatchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return 0, b.err
	}
	if b.open == 0 {
		return b.Conn.Write(p)
	}
	b.buf = append(b.buf, p...)
	if len(b.buf) >= MaxBatch {
		return len(p), b.flushLocked()
	}
	return len(p), nil
}

// Unwrap is the stream below.
func (b *BatchConn) Unwrap() net.Conn { return b.Conn }

// Begin opens a batch: writes are collected until the last open batch ends.
func (b *BatchConn) Begin() {
	b.mu.Lock()
	b.open++
	b.mu.Unlock()
}

// End closes a batch; the last open batch writes what was collected.
func (b *BatchConn) End() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.open--
	if b.open > 0 {
		return nil
	}
	return b.flushLocked()
}

func (b *BatchConn) flushLocked() error {
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

// BatchedTLS is a TLS session whose Writes reach the stream in one piece
// each: the session runs over Batch.
type BatchedTLS struct {
	*tls.Conn
	Batch *BatchConn
}

// Unwrap is the TLS connection.
func (c *BatchedTLS) Unwrap() net.Conn { return c.Conn }

func (c *BatchedTLS) Write(p []byte) (int, error) {
	c.Batch.Begin()
	n, err := c.Conn.Write(p)
	if ferr := c.Batch.End(); err == nil && ferr != nil {
		err = ferr
	}
	return n, err
}
