package tpd

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// A burst of datagrams from the client, sent as fast as QUIC lets it (many
// times http3's queue of 32 per request stream), reaches tpd's tun device in
// full, or each one lost is counted where it was lost: at tpd's UDP socket
// (the kernel's count), in quic-go's queues per connection (256 unread
// packets, 128 DATAGRAM frames: tp_udp_datagrams_dropped_total, reasons
// quic_packet_queue_full and quic_queue_full) or the tunnel's
// own (tp_ip_packets_dropped_total). None is lost on the way without a count
// (before tpd read datagrams below http3, about half of such a burst was),
// and the tunnel's own queue, longer than the burst, drops none. Counts
// only: how fast the burst goes does not matter.
func TestIPTunnelUploadBurstReachesTun(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t) {
		return
	}
	r := newIPRig(t, func(c *config.Server) {
		c.IPTunnel.IPPacketsPerSecond = 1_000_000
		c.IPTunnel.IPBytesPerSecond = 1 << 30
	})
	c := r.dialRaw(t, r.cert)
	sink, err := net.ListenPacket("udp4", "10.77.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sink.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := sink.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	dst := netip.MustParseAddrPort(sink.LocalAddr().String())
	src := netip.AddrPortFrom(c.v4(), 40011)
	const n = 1500 // < wire.IPDatagramQueue
	payload := make([]byte, 1000)
	st0, q0, k0 := r.d.proxy.IPTunnels().Stats(), r.d.proxy.UDPStats().QUICQueueFull+r.d.proxy.UDPStats().QUICPacketQueueFull, udpSocketDrops(t, r.port)
	for range n {
		c.send(t, udp4(src, dst, payload))
	}
	counts := func() (tun, dropped, quicQueue int64) {
		// The kernel's drops at tpd's socket are lost before QUIC: the
		// client's QUIC does not send a datagram again.
		quicQueue = udpSocketDrops(t, r.port) - k0
		st := r.d.proxy.IPTunnels().Stats()
		dropped = st.DroppedSource + st.DroppedDestination + st.DroppedRate + st.DroppedMalformed + st.DroppedTooBig + st.DroppedQueue -
			(st0.DroppedSource + st0.DroppedDestination + st0.DroppedRate + st0.DroppedMalformed + st0.DroppedTooBig + st0.DroppedQueue)
		u := r.d.proxy.UDPStats()
		return st.PacketsUp - st0.PacketsUp, dropped, quicQueue + u.QUICQueueFull + u.QUICPacketQueueFull - q0
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		tun, dropped, quicQueue := counts()
		if tun+dropped+quicQueue == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("of a burst of %d datagrams, %d reached the tun device, %d were counted as dropped by the tunnel and %d before it (the kernel's socket buffer, quic-go's queues): %d vanished without a count",
				n, tun, dropped, quicQueue, n-tun-dropped-quicQueue)
		}
		time.Sleep(10 * time.Millisecond) // polling for the counts, bounded by the deadline
	}
	tun, dropped, quicQueue := counts()
	if st := r.d.proxy.IPTunnels().Stats(); st.DroppedQueue != st0.DroppedQueue {
		t.Errorf("the tunnel's receive queue dropped %d datagrams of a burst of %d, shorter than the queue", st.DroppedQueue-st0.DroppedQueue, n)
	}
	t.Log(fmt.Sprintf("burst of %d: %d to the tun device, %d dropped by the tunnel, %d before it (the kernel's socket buffer, quic-go's queues)", n, tun, dropped, quicQueue))
}

// udpSocketDrops is what the kernel dropped, for a full receive buffer, at
// this namespace's UDP sockets bound to port (/proc/net/udp's drops column):
// tpd's, before QUIC saw them.
func udpSocketDrops(t *testing.T, port string) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/thread-self/net/udp")
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		t.Fatal(err)
	}
	suffix := fmt.Sprintf(":%04X", p)
	var n int64
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 13 || !strings.HasSuffix(f[1], suffix) {
			continue
		}
		v, _ := strconv.ParseInt(f[len(f)-1], 10, 64)
		n += v
	}
	return n
}
