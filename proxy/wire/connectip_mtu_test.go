package wire

import "testing"

// The MTU announced in ICMP too-big is the QUIC DATAGRAM frame's room less
// the quarter stream ID (a varint: 1 byte below stream 256, 2 below 65536, 4 from there) and the
// context ID: announcing the frame's room less only the context ID (the bug
// TestIPTunnelPacketTooBig found) leaves every packet of that size dropped.
func TestIPPacketMTU(t *testing.T) {
	for _, c := range []struct {
		frame, stream int64
		want          int
	}{{1400, 0, 1398}, {1400, 4, 1398}, {1400, 252, 1398}, {1400, 256, 1397}, {1300, 1 << 16, 1295}} {
		if got := IPPacketMTU(c.frame, c.stream); got != c.want {
			t.Errorf("IPPacketMTU(%d, stream %d) = %d, want %d", c.frame, c.stream, got, c.want)
		}
	}
}
