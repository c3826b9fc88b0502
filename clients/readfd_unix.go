//go:build unix

package clients

import "syscall"

// readFD is one read(2) on a non-blocking socket.
func readFD(fd uintptr, p []byte) (int, error) { return syscall.Read(int(fd), p) }
