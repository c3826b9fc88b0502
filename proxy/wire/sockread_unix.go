//go:build unix

package wire

import (
	"io"
	"net"
	"os"
	"syscall"
)

// rawReadConn returns the RawConn to read c through without a buffer while it
// waits, or nil to read c with Read.
func rawReadConn(c net.Conn) syscall.RawConn {
	var sc syscall.Conn
	switch c := c.(type) {
	case *net.TCPConn:
		sc = c
	case *net.UnixConn:
		sc = c
	default:
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// socketReader reads a socket inside syscall.RawConn.Read: read is called when
// the socket may be readable, takes the pooled buffer, and gives it back when
// the socket turns out to be empty, so the wait that follows holds none.
type socketReader struct {
	src net.Conn
	buf *[]byte
	n   int
	err error // io.EOF, or the failure as net.Conn.Read would report it
}

func (r *socketReader) read(fd uintptr) bool {
	if r.buf == nil {
		r.buf = takeBuf()
	}
	for {
		n, err := syscall.Read(int(fd), *r.buf)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			r.release()
			return false
		case err != nil:
			r.n, r.err = 0, &net.OpError{Op: "read", Net: r.src.LocalAddr().Network(), Source: r.src.LocalAddr(), Addr: r.src.RemoteAddr(), Err: os.NewSyscallError("read", err)}
		case n == 0:
			r.n, r.err = 0, io.EOF
		default:
			r.n, r.err = n, nil
		}
		return true
	}
}

func (r *socketReader) release() {
	if r.buf != nil {
		giveBuf(r.buf)
		r.buf = nil
	}
}
