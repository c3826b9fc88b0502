package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
)

// An idle direction holds no copy buffer of its own where it can avoid it. A
// socket (the destination's TCP connection, `tp forward`'s local one) is read
// through its RawConn: the 64 KiB pooled buffer is taken when the socket is
// readable and given back when a read finds it empty, before the wait. A TLS
// connection over TCP waits in a one-byte read (copyTLS). Any other source (a QUIC
// stream, whose Read cannot tell "nothing more yet" without waiting) blocks in
// Read holding a small buffer of smallBufSize, and takes the large one only while
// data moves in bulk: a read shorter than idleBufSize gives it back.
const (
	bridgeBufSize = 64 << 10
	idleBufSize   = 2 << 10
	smallBufSize  = 512
)

var bufPool = sync.Pool{New: func() any { b := make([]byte, bridgeBufSize); return &b }}

// bufsTaken counts the pooled buffers that copy loops hold right now.
var bufsTaken atomic.Int64

// CopyBuffersHeld is how many 64 KiB copy buffers Bridge holds right now, in all
// its sessions together: one per direction that is moving data in bulk or
// blocked writing it, none for an idle direction.
func CopyBuffersHeld() int64 { return bufsTaken.Load() }

func takeBuf() *[]byte {
	bufsTaken.Add(1)
	return bufPool.Get().(*[]byte)
}

func giveBuf(b *[]byte) {
	bufsTaken.Add(-1)
	bufPool.Put(b)
}

// closeWriter is implemented by *net.TCPConn, *net.UnixConn, *tls.Conn and stream
// adapters that can half-close.
type closeWriter interface{ CloseWrite() error }

// Bridge copies a→b and b→a until both directions end or ctx ends, then closes both
// connections.
//
// A clean end of one direction (EOF: a TCP FIN, a TLS close_notify, a QUIC FIN)
// half-closes the destination's write side (CloseWrite; for TLS that sends
// close_notify) and the other direction keeps running: ssh and similar protocols
// legitimately half-close and keep receiving for a long time, so only ctx bounds
// that wait. A destination that cannot half-close is closed entirely, since there
// is no other way to signal EOF to it.
//
// Anything else aborts the session: a read or write error on either side (a reset,
// a TLS session that ended without close_notify, a QUIC stream reset or a lost
// connection) or ctx ending. An abort resets both connections (Abort), so that
// neither peer can take the cut for a complete transfer; QUIC streams carry
// AbortCode of ctx's cause, or QUICPeerReset when a side failed.
//
// err is nil after a clean end, a *CutError naming the side that failed, or ctx's
// cause.
//
// While it runs, Bridge owns the read deadlines of a and b (a TLS source is
// drained with a deadline in the past, then the deadline is cleared: copyTLS):
// end a bridge with ctx, Close or Abort, never with a read deadline.
func Bridge(ctx context.Context, a, b net.Conn) (aToB, bToA int64, err error) {
	return BridgeNotify(ctx, a, b, nil)
}

// BridgeNotify is Bridge; beforeAbort, when set, runs once before an abort resets
// the connections (a server records why, for op "why", before the client can ask).
func BridgeNotify(ctx context.Context, a, b net.Conn, beforeAbort func(error)) (aToB, bToA int64, err error) {
	br := &bridgeState{ctx: ctx, a: a, b: b, beforeAbort: beforeAbort}
	stop := context.AfterFunc(ctx, func() {
		if br.ended.Load() == 2 {
			// Both directions ended cleanly: a cut now (the client, having
			// read the end, closed its connection) comes after the session.
			return
		}
		cause := context.Cause(ctx)
		br.abort(cause, AbortCode(cause))
	})

	// b→a runs on the caller's goroutine: an idle tunnel then holds two goroutine
	// stacks (this one and a→b) instead of three.
	done := make(chan struct{})
	go func() {
		defer close(done)
		aToB = br.pipe(b, a, false)
	}()
	bToA = br.pipe(a, b, true)
	<-done
	stop()
	br.end.Do(func() {
		br.closing.Store(true)
		_ = a.Close()
		_ = b.Close()
	})
	return aToB, bToA, br.err
}

// ReadEnder is a connection told when Bridge has read it to its clean end
// (*QUICStream: op "bye" waits for that).
type ReadEnder interface{ ReadEnded() }

type bridgeState struct {
	ctx         context.Context
	a, b        net.Conn
	beforeAbort func(error)
	end         sync.Once    // the one end: an abort, or the final close
	closing     atomic.Bool  // Bridge closes or resets the connections itself
	ended       atomic.Int32 // directions that reached their clean end
	err         error        // why it aborted; written inside end
	// halfClosed[0] and [1]: Bridge half-closed a (b): its own FIN went
	// first, and the socket's state no longer tells a reset (resetByPeer).
	halfClosed [2]atomic.Bool
}

// abort resets both connections, once, unless the session already ended.
func (br *bridgeState) abort(err error, code quic.ApplicationErrorCode) {
	br.end.Do(func() {
		br.err = err
		if br.beforeAbort != nil {
			br.beforeAbort(err)
		}
		br.closing.Store(true)
		Abort(br.a, code)
		Abort(br.b, code)
	})
}

// pipe copies src to dst; srcIsB says which of Bridge's connections src is. At a
// clean EOF it half-closes dst; on any failure it aborts the session.
func (br *bridgeState) pipe(dst, src net.Conn, srcIsB bool) int64 {
	n, rerr, werr := copyConn(dst, src)
	if rerr == nil && werr == nil && tlsTruncated(src) {
		rerr = ErrTruncated
	}
	if rerr == nil && werr == nil && !br.halfClosed[b2i(srcIsB)].Load() && resetByPeer(src) {
		rerr = errResetByPeer // the reset went to a write on the same socket
	}
	switch {
	case rerr != nil:
		br.failed(srcIsB, rerr)
	case werr != nil:
		br.failed(!srcIsB, werr)
	default:
		// Counted before the end is passed on: the peer that reads it may
		// close at once, and that is no cut of this session.
		br.ended.Add(1)
		if re, ok := src.(ReadEnder); ok {
			re.ReadEnded() // from here a close of src's connection cuts nothing
		}
		cw, ok := dst.(closeWriter)
		if !ok {
			br.closing.Store(true) // the other direction then ends with a closed connection
			_ = dst.Close()
			return n
		}
		br.halfClosed[b2i(!srcIsB)].Store(true) // before the FIN leaves
		if err := cw.CloseWrite(); err != nil {
			br.failed(!srcIsB, err)
		}
	}
	return n
}

// errResetByPeer is the read error of a source whose reset a write took
// (resetByPeer).
var errResetByPeer = &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// failed aborts the session because side B (or A) failed with err. An error that
// Bridge caused itself (it closed or reset the connection) is no new failure.
// Once ctx has ended, its cause is why the session ends even if a side's
// failure gets here first: ctx's AfterFunc runs on a goroutine of its own, and
// the cut that ended ctx (a peer instance's shutdown notice, a revocation) may
// reset a side before that goroutine runs.
func (br *bridgeState) failed(isB bool, err error) {
	if br.closing.Load() && (errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrClosedPipe)) {
		return
	}
	if cause := context.Cause(br.ctx); cause != nil {
		br.abort(cause, AbortCode(cause))
		return
	}
	br.abort(&CutError{B: isB, Err: err}, QUICPeerReset)
}

// copyConn copies src to dst until EOF (both errors nil) or a failure: rerr of
// reading src, or werr of writing dst.
func copyConn(dst, src net.Conn) (written int64, rerr, werr error) {
	// TCP to TCP: let the kernel splice.
	_, dstTCP := dst.(*net.TCPConn)
	_, srcTCP := src.(*net.TCPConn)
	if dstTCP && srcTCP {
		n, err := io.Copy(dst, src)
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Op == "write" {
			return n, nil, err
		}
		return n, err, nil
	}
	if rc := rawReadConn(src); rc != nil {
		return copySocket(dst, src, rc)
	}
	if tlsOverTCP(src) {
		return copyTLS(dst, src)
	}
	settling, _ := src.(Settler)
	small := make([]byte, smallBufSize)
	var big *[]byte
	defer func() {
		if big != nil {
			giveBuf(big)
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
				return written, nil, werr
			}
			if w != n {
				return written, nil, io.ErrShortWrite
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return written, nil, nil
			}
			return written, err, nil
		}
		if settling != nil {
			if t := settling.Settled(); t != nil {
				settling = nil
				if tlsOverTCP(t) { // read on as copyTLS reads
					if big != nil {
						giveBuf(big)
						big = nil
					}
					m, rerr, werr := copyTLS(dst, t)
					return written + m, rerr, werr
				}
			}
		}
		switch {
		case big == nil && n == len(small): // data is moving: copy in large chunks
			big = takeBuf()
		case big != nil && n < idleBufSize: // back to a trickle: give the large buffer back
			giveBuf(big)
			big = nil
		}
	}
}

// copyTLS is copyConn for a source whose reads come from a TLS connection over
// TCP. It waits in a one-byte Read: crypto/tls decrypts the record that ends the
// wait into its own buffer (which it keeps anyway) and hands over one byte. Only
// then is the pooled buffer taken, and everything the TLS connection already
// holds (the rest of the record, further records received with it) is read
// with a read deadline in the past: a TLS connection returns the data it holds
// even then, and a deadline only fails the read of its transport, leaving the
// TLS connection usable. When it holds no more, the buffer goes back before the
// next wait.
func copyTLS(dst, src net.Conn) (written int64, rerr, werr error) {
	var big *[]byte
	defer func() {
		if big != nil {
			giveBuf(big)
		}
	}()
	one := make([]byte, 1)
	for {
		n, err := src.Read(one) // the wait: no buffer of ours but this byte
		if n > 0 {
			big = takeBuf()
			(*big)[0] = one[0]
			held := err == nil && src.SetReadDeadline(aLongTimeAgo) == nil
			for {
				if held {
					var m int
					m, err = src.Read((*big)[n:])
					n += m
				}
				if n > 0 {
					w, werr := dst.Write((*big)[:n])
					written += int64(w)
					if werr != nil {
						return written, nil, werr
					}
					if w != n {
						return written, nil, io.ErrShortWrite
					}
					n = 0
				}
				if !held || err != nil {
					break
				}
			}
			if held {
				if errors.Is(err, os.ErrDeadlineExceeded) { // it held no more: wait again
					err = nil
				}
				if derr := src.SetReadDeadline(time.Time{}); err == nil {
					err = derr
				}
			}
			giveBuf(big)
			big = nil
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return written, nil, nil
			}
			return written, err, nil
		}
	}
}

// aLongTimeAgo is a read deadline that has passed: a read with it returns only
// what is already there.
var aLongTimeAgo = time.Unix(1, 0)

// HeldReader is implemented by a stream that reads as copyTLS needs: a Read
// past its read deadline still returns the data the stream holds, and a
// deadline leaves it usable (a stream of tp-mux/1, proxy/mux). Bridge waits
// on it in a one-byte read, holding no buffer while it is idle.
type HeldReader interface {
	net.Conn
	ReadsHeld()
}

// Settler is implemented by a connection that turns into another once it is
// established, such as a dial that returned before the server's answer:
// Settled returns that connection once reading it gives what reading the
// Settler would, else nil. Bridge then reads it as it would read that one.
type Settler interface {
	Settled() net.Conn
}

// ReadThrough is implemented by a wrapper whose Read and SetReadDeadline pass
// the wrapped connection's bytes, errors and deadlines through unchanged, so
// that Bridge may read it as it would read the connection it wraps.
type ReadThrough interface {
	Unwrap() net.Conn
	ReadsThrough()
}

// tlsOverTCP reports whether c is a *tls.Conn, or wraps one only with
// ReadThrough wrappers, that runs right on a TCP connection (or on EOFConn over
// one), or is (so wraps) a HeldReader: their deadlines behave as copyTLS needs. Any other wrapper (a framing of
// its own, like a protected session's sealed records) may not survive a read
// that ends at a deadline, and a TLS connection inside another stream leaves
// deadlines to that stream.
func tlsOverTCP(c net.Conn) bool {
	for {
		switch v := c.(type) {
		case *tls.Conn:
			below := v.NetConn()
			if e, ok := below.(*EOFConn); ok {
				below = e.Conn
			}
			_, ok := below.(*net.TCPConn)
			return ok
		case ReadThrough:
			c = v.Unwrap()
		case HeldReader:
			return true
		default:
			return false
		}
	}
}

// copySocket is copyConn for a source socket read through its RawConn rc: it
// waits for data holding no buffer, and reads into a pooled one only once the
// socket is readable.
func copySocket(dst, src net.Conn, rc syscall.RawConn) (written int64, rerr, werr error) {
	r := &socketReader{src: src}
	read := r.read // one closure for every wait, not one per call
	defer r.release()
	for {
		if err := rc.Read(read); err != nil {
			return written, err, nil // closed or past its deadline
		}
		if r.n > 0 {
			w, werr := dst.Write((*r.buf)[:r.n])
			written += int64(w)
			if werr != nil {
				return written, nil, werr
			}
			if w != r.n {
				return written, nil, io.ErrShortWrite
			}
		}
		if r.err != nil {
			if errors.Is(r.err, io.EOF) {
				return written, nil, nil
			}
			return written, r.err, nil
		}
	}
}

// IsNormalEnd reports whether err is an ordinary way for a stream to end: EOF, or
// the connection closed locally (net.ErrClosed, io.ErrClosedPipe for in-memory
// pipes). A reset or broken pipe from the peer is not: it is an abort, and data
// may be missing.
func IsNormalEnd(err error) bool {
	return err == nil ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, net.ErrClosed) ||
		errors.Is(err, io.ErrClosedPipe)
}
