//go:build linux

package carrier

import (
	"encoding/binary"

	"golang.org/x/sys/unix"
)

// gsoSize is the segment size of a UDP_SEGMENT control message in oob (quic-go
// asks for GSO that way), 0 without one.
func gsoSize(oob []byte) int {
	for len(oob) > 0 {
		hdr, body, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return 0
		}
		if hdr.Level == unix.IPPROTO_UDP && hdr.Type == unix.UDP_SEGMENT && len(body) >= 2 {
			return int(binary.NativeEndian.Uint16(body))
		}
		oob = rest
	}
	return 0
}
