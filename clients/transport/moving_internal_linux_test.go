package transport

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/quic-go/quic-go"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// packetLink is a carrier link that keeps the packets written to it and
// hands out those given to it: the framing MovingConn does on a carrier is
// what it shows.
type packetLink struct {
	mu      sync.Mutex
	written [][]byte
	more    chan struct{} // a packet was written
	in      chan []byte
	once    sync.Once
	closed  chan struct{}
}

func newPacketLink() *packetLink {
	return &packetLink{more: make(chan struct{}, 1), in: make(chan []byte, 8), closed: make(chan struct{})}
}

func (l *packetLink) ReadPacket(b []byte) (int, error) {
	select {
	case p := <-l.in:
		return copy(b, p), nil
	case <-l.closed:
		return 0, net.ErrClosed
	}
}

func (l *packetLink) WritePacket(b []byte) error {
	l.mu.Lock()
	l.written = append(l.written, bytes.Clone(b))
	l.mu.Unlock()
	select {
	case l.more <- struct{}{}:
	default:
	}
	return nil
}

func (l *packetLink) Flush() error { return nil }
func (l *packetLink) Close() error { l.once.Do(func() { close(l.closed) }); return nil }

// packets waits until n packets were written, and returns them.
func (l *packetLink) packets(t *testing.T, n int) [][]byte {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		l.mu.Lock()
		got := append([][]byte(nil), l.written...)
		l.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-l.more:
		case <-deadline:
			t.Fatalf("the carrier link got %d packets in 10s, want %d", len(got), n)
		}
	}
}

func segmentOOB(size int) []byte {
	oob := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.IPPROTO_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], uint16(size))
	return oob
}

// burst is n packets of size bytes and a last one of last bytes, each packet
// filled with its index plus base.
func burst(n, size, last int, base byte) []byte {
	var b []byte
	for i := range n {
		b = append(b, bytes.Repeat([]byte{base + byte(i)}, size)...)
	}
	return append(b, bytes.Repeat([]byte{base + byte(n)}, last)...)
}

// MovingConn keeps quic-go's fast path on UDP and cuts a segmented send into
// its packets on a carrier: a GSO send over UDP arrives as its datagrams; on
// a move, the last packets are sent again one by one over the carrier; a GSO
// send on the carrier becomes one carrier packet per datagram; a carrier
// packet is read as from the server; back on UDP a coalesced burst is read as
// its datagrams.
func TestMovingConnSegments(t *testing.T) {
	listen := func() *net.UDPConn {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	udp, server := listen(), listen()
	saddr := server.LocalAddr().(*net.UDPAddr)
	m := NewMovingConn(udp, saddr)

	// Over UDP: 4 × 1200 + 700 bytes in one segmented send.
	b := burst(4, 1200, 700, 'a')
	if n, _, err := m.WriteMsgUDP(b, segmentOOB(1200), saddr); err != nil || n != len(b) {
		t.Fatalf("segmented send over UDP: %d, %v", n, err)
	}
	_ = server.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 65536)
	for i := range 5 {
		n, err := server.Read(buf)
		if err != nil {
			t.Fatalf("datagram %d of the segmented send: %v", i, err)
		}
		if want := b[i*1200 : min((i+1)*1200, len(b))]; !bytes.Equal(buf[:n], want) {
			t.Fatalf("datagram %d: %d bytes of %q, want %d of %q", i, n, buf[:1], len(want), want[:1])
		}
	}

	// Its connections run without path MTU discovery: quic-go does not see a
	// move, and a size learnt on one path would stay on the next.
	if !configFor(m, &quic.Config{}).DisablePathMTUDiscovery || configFor(udp, &quic.Config{}).DisablePathMTUDiscovery {
		t.Fatal("path MTU discovery: want it off on a MovingConn only")
	}

	// Packets of a coalesced read not yet handed out when the connection
	// moves come first, before the carrier's.
	b0 := burst(4, 1000, 500, '0')
	if _, _, err := server.WriteMsgUDP(b0, segmentOOB(1000), udp.LocalAddr().(*net.UDPAddr)); err != nil {
		t.Fatal(err)
	}
	_ = m.SetReadDeadline(time.Now().Add(10 * time.Second))
	two := make([]ipv4.Message, 2)
	for i := range two {
		two[i].Buffers, two[i].OOB = [][]byte{make([]byte, 1500)}, make([]byte, 128)
	}
	var early [][]byte
	for len(early) < 2 {
		n, err := m.ReadBatch(two, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, msg := range two[:n] {
			early = append(early, bytes.Clone(msg.Buffers[0][:msg.N]))
		}
	}
	_ = m.SetReadDeadline(time.Time{})

	// The move sends the last 4 packets again, each on its own.
	link := newPacketLink()
	cc, err := NewCarrierConn(context.Background(), "tls", "server", func(context.Context) (CarrierLink, error) { return link, nil })
	if err != nil {
		t.Fatal(err)
	}
	m.MoveTo(cc)
	got := link.packets(t, 4)
	for i, p := range got[:4] {
		if want := b[(i+1)*1200 : min((i+2)*1200, len(b))]; !bytes.Equal(p, want) {
			t.Fatalf("replayed packet %d: %d bytes of %q, want %d of %q", i, len(p), p[:1], len(want), want[:1])
		}
	}

	// A segmented send on the carrier: one carrier packet per datagram.
	b2 := burst(2, 1000, 10, 'k')
	if n, _, err := m.WriteMsgUDP(b2, segmentOOB(1000), saddr); err != nil || n != len(b2) {
		t.Fatalf("segmented send on the carrier: %d, %v", n, err)
	}
	got = link.packets(t, 7)
	for i, p := range got[4:7] {
		if want := b2[i*1000 : min((i+1)*1000, len(b2))]; !bytes.Equal(p, want) {
			t.Fatalf("carrier packet %d of the segmented send: %d bytes of %q, want %d of %q", i, len(p), p[:1], len(want), want[:1])
		}
	}

	// The rest of the burst read before the move, then a packet from the
	// carrier, which reads as from the server.
	link.in <- []byte("from the carrier")
	ms := make([]ipv4.Message, 8)
	for i := range ms {
		ms[i].Buffers, ms[i].OOB = [][]byte{make([]byte, 1500)}, make([]byte, 128)
	}
	for len(early) < 5 {
		n, err := m.ReadBatch(ms, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, msg := range ms[:n] {
			if string(msg.Buffers[0][:msg.N]) == "from the carrier" {
				t.Fatalf("the carrier's packet came after %d of the 5 the UDP socket had brought before the move", len(early))
			}
			early = append(early, bytes.Clone(msg.Buffers[0][:msg.N]))
		}
	}
	for i, p := range early {
		if want := b0[i*1000 : min((i+1)*1000, len(b0))]; !bytes.Equal(p, want) {
			t.Fatalf("datagram %d of the burst before the move: %d bytes of %q, want %d of %q", i, len(p), p[:1], len(want), want[:1])
		}
	}
	if n, err := m.ReadBatch(ms, 0); err != nil || n != 1 || string(ms[0].Buffers[0][:ms[0].N]) != "from the carrier" || ms[0].Addr != net.Addr(saddr) {
		t.Fatalf("read on the carrier: %d messages, %q from %v, %v", n, ms[0].Buffers[0][:ms[0].N], ms[0].Addr, err)
	}

	// Back on UDP, a burst the server sends in one segmented write is read
	// as its datagrams.
	m.MoveBack()
	_ = cc.Close()
	b3 := burst(5, 1100, 300, 'A')
	if _, _, err := server.WriteMsgUDP(b3, segmentOOB(1100), udp.LocalAddr().(*net.UDPAddr)); err != nil {
		t.Fatal(err)
	}
	_ = m.SetReadDeadline(time.Now().Add(10 * time.Second))
	var read [][]byte
	for len(read) < 6 {
		n, err := m.ReadBatch(ms, 0)
		if err != nil {
			t.Fatalf("after %d datagrams of the burst: %v", len(read), err)
		}
		for _, msg := range ms[:n] {
			read = append(read, bytes.Clone(msg.Buffers[0][:msg.N]))
		}
	}
	for i, p := range read {
		if want := b3[i*1100 : min((i+1)*1100, len(b3))]; !bytes.Equal(p, want) {
			t.Fatalf("datagram %d of the burst: %d bytes of %q, want %d of %q", i, len(p), p[:1], len(want), want[:1])
		}
	}
}
