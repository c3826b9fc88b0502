package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
)

// An idle direction blocks in Read holding only a small buffer; a large pooled
// buffer is taken while data moves in bulk and given back when reads come back
// small again, so thousands of idle tunnels do not pin 64 KiB each.
const (
	bridgeBufSize = 64 << 10
	idleBufSize   = 2 << 10
)

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

	// b→a runs on the caller's goroutine: an idle tunnel then holds two goroutine
	// stacks (this one and a→b) instead of three.
	var errAB, errBA error
	done := make(chan struct{})
	go func() {
		defer close(done)
		aToB, errAB = pipe(b, a, closeBoth)
	}()
	bToA, errBA = pipe(a, b, closeBoth)
	<-done
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
	// TCP to TCP: let the kernel splice.
	_, dstTCP := dst.(*net.TCPConn)
	_, srcTCP := src.(*net.TCPConn)
	if dstTCP && srcTCP {
		return io.Copy(dst, src)
	}
	var written int64
	small := make([]byte, idleBufSize)
	var big *[]byte
	defer func() {
		if big != nil {
			bufPool.Put(big)
		}
	}()
	for {
		buf := small
		if big != nil {
			buf = *big
		}
		n, err := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			written += int64(w)
			if werr != nil {
				return written, werr
			}
			if w != n {
				return written, io.ErrShortWrite
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return written, nil
			}
			return written, err
		}
		switch {
		case big == nil && n == len(small): // data is moving: copy in large chunks
			big = bufPool.Get().(*[]byte)
		case big != nil && n < idleBufSize: // back to a trickle: give the large buffer back
			bufPool.Put(big)
			big = nil
		}
	}
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
