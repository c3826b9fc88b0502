//go:build !unix

package wire

import (
	"net"
	"syscall"
)

// rawReadConn returns nil: outside Unix, RawConn.Read does not wait for
// readability, so every source is read with Read (copyConn).
func rawReadConn(net.Conn) syscall.RawConn { return nil }

type socketReader struct {
	src net.Conn
	buf *[]byte
	n   int
	err error
}

func (r *socketReader) read(uintptr) bool { return true }
func (r *socketReader) release()          {}
