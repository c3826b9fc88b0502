package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
)

const bridgeBufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bridgeBufSize); return &b }}

// closeWriter is implemented by *net.TCPConn, *net.UnixConn, *tls.Conn and stream
// adapters that can half-close.
type closeWriter interface{ CloseWrite() error }

// Bridge copies a→b and b→a until both directions end or ctx ends, then closes both
// connections. When one direction reaches EOF, the destination's write side is
// half-closed (CloseWrite; for TLS that sends close_notify) and the other direction
// keeps running: ssh and similar protocols legitimately half-close and keep
// receiving for a long time, so only ctx bounds that wait. A destination that cannot
// half-close is closed entirely, since there is no other way to signal EOF to it.
//
// A read or write error in either direction tears down both. EOF, ECONNRESET, EPIPE
// and closed-connection errors are normal ends and are not reported; if ctx ended the session,
// err is context.Cause(ctx).
func Bridge(ctx context.Context, a, b net.Conn) (aToB, bToA int64, err error) {
	var closeOnce sync.Once
	closeBoth := func() {
		closeOnce.Do(func() {
			_ = a.Close()
			_ = b.Close()
		})
	}
	stop := context.AfterFunc(ctx, closeBoth)

	var wg sync.WaitGroup
	var errAB, errBA error
	wg.Add(2)
	go func() {
		defer wg.Done()
		aToB, errAB = pipe(b, a, closeBoth)
	}()
	go func() {
		defer wg.Done()
		bToA, errBA = pipe(a, b, closeBoth)
	}()
	wg.Wait()
	ctxEnded := !stop()
	closeBoth()
	if ctxEnded {
		return aToB, bToA, context.Cause(ctx)
	}
	return aToB, bToA, errors.Join(errAB, errBA)
}

// pipe copies src to dst. At EOF it half-closes dst; on error it calls abort.
func pipe(dst, src net.Conn, abort func()) (int64, error) {
	n, err := copyConn(dst, src)
	if err != nil {
		abort()
		if IsNormalEnd(err) {
			err = nil
		}
		return n, err
	}
	if cw, ok := dst.(closeWriter); ok {
		if cerr := cw.CloseWrite(); cerr != nil && !IsNormalEnd(cerr) {
			abort()
			return n, cerr
		}
		return n, nil
	}
	abort()
	return n, nil
}

func copyConn(dst, src net.Conn) (int64, error) {
	// TCP to TCP: let the kernel splice. Anything else: hide ReaderFrom/WriterTo so
	// io.CopyBuffer uses the pooled 64 KiB buffer instead of allocating 32 KiB.
	_, dstTCP := dst.(*net.TCPConn)
	_, srcTCP := src.(*net.TCPConn)
	if dstTCP && srcTCP {
		return io.Copy(dst, src)
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	return io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *bp)
}

// IsNormalEnd reports whether err is an ordinary way for a stream to end: EOF, the
// connection closed locally (net.ErrClosed, io.ErrClosedPipe for in-memory pipes),
// or reset/broken pipe from the peer.
func IsNormalEnd(err error) bool {
	return err == nil ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, net.ErrClosed) ||
		errors.Is(err, io.ErrClosedPipe) ||
		errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE)
}
