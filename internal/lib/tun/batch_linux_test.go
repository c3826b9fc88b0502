//go:build linux

package tun

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// The batch paths against the real kernel, in a network namespace of the
// test's own: this process plays a TCP peer at 10.9.0.2 behind
// a tun device whose local end, 10.9.0.1, is the kernel's TCP.
//
//   - Writer joins 32 consecutive segments of the peer's into one write
//     (GRO): the kernel's socket reads all of their bytes, in order.
//   - Reader splits what the kernel's TCP sends as segments of up to 64 KiB
//     (TSO) into packets of the MTU: 256 KiB arrive intact, no packet longer
//     than the MTU, and at least one read returned several packets.
//   - Segments whole: ReadSegment hands over the kernel's TCP segments
//     unsplit, each with the MSS as its segment size, whose data is what the
//     socket wrote; Split cuts one into the packets Read would have given;
//     a 64 KiB segment written with WriteSegment reaches the socket whole,
//     and segments CheckSegment refuses (no segment size, more than
//     MaxSegmentPackets packets, a SYN, an IP length that lies) are not
//     written.
//   - Bad input costs nothing: a batch of malformed packets (a header length
//     beyond the packet, a truncated TCP header, a length field that lies,
//     random bytes, and two "segments" of one flow whose checksums are wrong)
//     is written without a panic, and the device works afterwards.
func TestBatchesThroughTheKernel(t *testing.T) {
	if !testnet.InNetns(t) {
		return
	}
	batchesInNamespace(t)
}

const (
	testMTU  = 1280
	testMSS  = 1240
	peerPort = 40000
)

var (
	localAddr = netip.MustParseAddr("10.9.0.1")
	peerAddr  = netip.MustParseAddr("10.9.0.2")
)

func batchesInNamespace(t *testing.T) {
	ctx := context.Background()
	dev, err := Open("tptest%d")
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if err := dev.Up(ctx, testMTU); err != nil {
		t.Fatal(err)
	}
	if err := AddAddress(ctx, dev.Name(), netip.MustParsePrefix("10.9.0.1/24")); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp4", "10.9.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)

	r := dev.NewReader(testMTU, 0)
	w := dev.NewWriter(testMTU)
	deadline := time.Now().Add(20 * time.Second)
	p, c := handshake(t, r, w, ln, port, peerPort, testMSS, deadline)
	defer c.Close()

	// Writer: 32 segments in one batch, read whole by the kernel's socket.
	up := make([]byte, 32*1200)
	_, _ = rand.Read(up)
	for i := range 32 {
		flags := byte(tcpACK)
		if i == 31 {
			flags |= tcpPSH
		}
		p.send(flags, up[i*1200:(i+1)*1200], nil)
	}
	if w.Len() != 0 {
		t.Fatalf("a batch of 32 was not flushed when full: %d wait", w.Len())
	}
	got := make([]byte, len(up))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("the kernel's socket read %v of the batch", err)
	}
	if !bytes.Equal(got, up) {
		t.Fatal("the 32 segments written as one batch arrived changed")
	}

	// Reader: 256 KiB from the kernel's TCP, acknowledged as it comes.
	maxBatch := download(t, p, c, 256<<10, deadline)
	if maxBatch < 2 {
		t.Fatalf("no read returned more than one packet: the kernel handed over no segment to split")
	}
	t.Logf("largest batch read: %d packets", maxBatch)

	// A peer with a small MSS (536, as one that sends none): 64 KiB in
	// packets that small would be 123, more than a Reader holds; the
	// device's bound on segments (Up) makes the kernel send smaller segments,
	// so nothing is lost.
	p2, c2 := handshake(t, r, w, ln, port, peerPort+1, 536, deadline)
	defer c2.Close()
	download(t, p2, c2, 1<<20, deadline)
	if d := r.Dropped(); d != 0 {
		t.Fatalf("%d reads did not split into packets", d)
	}

	segmentsWhole(t, r, w, ln, port, deadline)

	// Bad input: a batch of malformed packets, then the device still works.
	good := p.packet(tcpACK, []byte("x"), nil)
	var bad [][]byte
	b := bytes.Clone(good)
	b[0] = 0x4f // a header of 60 bytes, longer than what follows it
	bad = append(bad, b)
	bad = append(bad, good[:30]) // a TCP header cut short
	b = bytes.Clone(good)
	binary.BigEndian.PutUint16(b[2:], 9000) // a total length that lies
	bad = append(bad, b)
	junk := make([]byte, 700)
	_, _ = rand.Read(junk)
	junk[0] = 0x45
	bad = append(bad, junk)
	for range 2 { // two segments of one flow, checksums wrong
		b = p.packet(tcpACK, make([]byte, 1000), nil)
		b[37] ^= 0xff
		bad = append(bad, b)
	}
	for _, pkt := range bad {
		if _, err := w.Add(pkt); err != nil {
			t.Logf("a bad packet was refused at once: %v", err)
		}
	}
	refused, err := w.Flush()
	t.Logf("a batch of %d malformed packets: %d refused (%v)", len(bad), refused, err)
	if w.Len() != 0 {
		t.Fatal("the Writer kept packets after Flush")
	}
	if _, err := c.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	for {
		if time.Now().After(deadline) {
			t.Fatal("after the malformed batch the device carried nothing")
		}
		batch, err := r.Read()
		if err != nil {
			t.Fatal(err)
		}
		for _, pkt := range batch {
			if _, data, ok := parseTCP(pkt); ok && string(data) == "still here" {
				return
			}
		}
	}
}

func segmentsWhole(t *testing.T, r *Reader, w *Writer, ln net.Listener, port uint16, deadline time.Time) {
	p, c := handshake(t, r, w, ln, port, peerPort+2, testMSS, deadline)
	defer c.Close()
	down := make([]byte, 1<<20)
	_, _ = rand.Read(down)
	go func() { _, _ = c.Write(down) }()
	start := p.ack
	recv := make([]byte, len(down))
	have, segs, split := 0, 0, false
	for have < len(down) {
		if time.Now().After(deadline) {
			t.Fatalf("received %d of %d bytes before the deadline (%d segments)", have, len(down), segs)
		}
		batch, size, err := r.ReadSegment()
		if err != nil {
			t.Fatal(err)
		}
		if size > 0 {
			if len(batch) != 1 || size > testMSS {
				t.Fatalf("ReadSegment returned %d elements with a segment size of %d (MSS %d)", len(batch), size, testMSS)
			}
			n, err := CheckSegment(batch[0], size)
			if err != nil || n < 2 {
				t.Fatalf("a segment ReadSegment kept makes %d packets: %v", n, err)
			}
			segs++
			if !split {
				// Split gives the packets Read would have: each within the
				// MTU, its checksum right, their data the segment's.
				seg := batch[0] // Split reuses the batch, not the segment's buffer
				_, whole, _ := parseTCP(seg)
				whole = bytes.Clone(whole)
				pkts, err := r.Split()
				if err != nil || len(pkts) != n {
					t.Fatalf("Split made %d packets of a segment of %d: %v", len(pkts), n, err)
				}
				var joined []byte
				for _, pkt := range pkts {
					_, data, ok := parseTCP(pkt)
					if !ok || len(pkt) > testMTU || !tcpChecksumValid(pkt) {
						t.Fatalf("Split made a packet of %d bytes (MTU %d) that does not parse or whose checksum is wrong", len(pkt), testMTU)
					}
					joined = append(joined, data...)
				}
				if !bytes.Equal(joined, whole) {
					t.Fatal("the packets Split made do not carry the segment's data")
				}
				split = true
				batch = [][]byte{seg}
			}
		}
		have = p.receive(batch, start, recv, have, nil)
	}
	if !bytes.Equal(recv, down) {
		t.Fatal("the data read in segments arrived changed")
	}
	if segs == 0 {
		t.Fatal("ReadSegment kept no segment whole: the kernel sent 1 MiB in packets only")
	}
	t.Logf("1 MiB from the kernel's TCP in %d segments whole", segs)

	// A segment of 52 packets of 1,240 bytes, written whole.
	up := make([]byte, 52*testMSS)
	_, _ = rand.Read(up)
	seg := p.packet(tcpACK|tcpPSH, up, nil)
	for i := 36; i < 38; i++ {
		seg[i] = 0 // the TCP checksum: the kernel computes every packet's
	}
	w.TakeCounts() // the acknowledgements so far
	if err := w.WriteSegment(seg, testMSS); err != nil {
		t.Fatalf("WriteSegment of a segment of 52 packets: %v", err)
	}
	p.seq += uint32(len(up))
	got := make([]byte, len(up))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, up) {
		t.Fatalf("the segment written whole arrived changed or short: %v", err)
	}
	if wc := w.TakeCounts(); wc.Packets != 52 || wc.Refused != 0 {
		t.Fatalf("WriteSegment counted %+v, want 52 packets written", wc)
	}

	// Segments WriteSegment refuses, and writes nothing of.
	bad := map[string]func() ([]byte, int){
		"a segment size of 0": func() ([]byte, int) { return p.packet(tcpACK, up, nil), 0 },
		"a segment size of 1": func() ([]byte, int) { return p.packet(tcpACK, up[:60], nil), 1 },
		"65 packets of 1,000 bytes": func() ([]byte, int) {
			return p.packet(tcpACK, make([]byte, 65*1000), nil), 1000
		},
		"a SYN": func() ([]byte, int) { return p.packet(tcpACK|tcpSYN, up, nil), testMSS },
		"an IPv4 length that lies": func() ([]byte, int) {
			b := p.packet(tcpACK, up, nil)
			binary.BigEndian.PutUint16(b[2:], 1500)
			return b, testMSS
		},
	}
	for what, mk := range bad {
		seg, size := mk()
		if err := w.WriteSegment(seg, size); err == nil {
			t.Fatalf("WriteSegment took %s", what)
		}
	}
	if wc := w.TakeCounts(); wc.Packets != 0 || wc.Refused != int64(len(bad)) {
		t.Fatalf("the refused segments counted %+v, want %d refused", wc, len(bad))
	}
	// The connection goes on: nothing of the refused segments arrived.
	more := []byte("after the refused segments")
	p.send(tcpACK|tcpPSH, more, nil)
	p.flush()
	got = make([]byte, len(more))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, more) {
		t.Fatalf("after the refused segments the socket read %q: %v", got, err)
	}
}

// handshake connects a peer at peerAddr:sport, announcing MSS mss, to ln.
func handshake(t *testing.T, r *Reader, w *Writer, ln net.Listener, port, sport, mss uint16, deadline time.Time) (*tcpPeer, net.Conn) {
	p := &tcpPeer{t: t, r: r, w: w, port: port, sport: sport, seq: 1000}
	p.send(tcpSYN, nil, mssOption(mss))
	p.flush()
	synack := p.next(deadline, func(h tcpHeader) bool { return h.flags&tcpSYN != 0 })
	p.seq++
	p.ack = synack.seq + 1
	p.send(tcpACK, nil, nil)
	p.flush()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(deadline)
	return p, c
}

// download has the kernel's TCP send n random bytes on c to p, which
// acknowledges what arrives in order, checks every packet (no longer than
// the MTU, its checksum right) and the whole; it returns the largest batch
// a read gave.
// receive copies the data batch carries for p in order into recv, of which
// have bytes (from sequence number start) had arrived, acknowledges what has
// arrived, and returns how much that is; check, when given, sees every packet
// for p that carries data.
func (p *tcpPeer) receive(batch [][]byte, start uint32, recv []byte, have int, check func(pkt []byte, h tcpHeader, data []byte)) int {
	for _, pkt := range batch {
		h, data, ok := parseTCP(pkt)
		if !ok || h.dstPort != p.sport || len(data) == 0 {
			continue
		}
		if check != nil {
			check(pkt, h, data)
		}
		if off := int(h.seq - start); off == have {
			have += copy(recv[off:], data)
		}
	}
	p.ack = start + uint32(have)
	p.send(tcpACK, nil, nil)
	p.flush()
	return have
}

func download(t *testing.T, p *tcpPeer, c net.Conn, n int, deadline time.Time) int {
	down := make([]byte, n)
	_, _ = rand.Read(down)
	go func() { _, _ = c.Write(down) }()
	start := p.ack
	recv := make([]byte, len(down))
	have, maxBatch := 0, 0
	for have < len(down) {
		if time.Now().After(deadline) {
			t.Fatalf("received %d of %d bytes before the deadline (largest batch %d)", have, len(down), maxBatch)
		}
		batch, err := p.r.Read()
		if err != nil {
			t.Fatal(err)
		}
		maxBatch = max(maxBatch, len(batch))
		have = p.receive(batch, start, recv, have, func(pkt []byte, h tcpHeader, data []byte) {
			if len(pkt) > testMTU {
				t.Fatalf("a packet of %d bytes from a device of MTU %d", len(pkt), testMTU)
			}
			if !tcpChecksumValid(pkt) {
				t.Fatalf("a split packet (seq %d, %d bytes) has a wrong checksum", h.seq, len(data))
			}
		})
	}
	if !bytes.Equal(recv, down) {
		t.Fatalf("the %d bytes read through the Reader arrived changed", n)
	}
	return maxBatch
}

const (
	tcpSYN = 0x02
	tcpPSH = 0x08
	tcpACK = 0x10
)

// tcpPeer is a minimal TCP end at peerAddr:peerPort that sends through w.
type tcpPeer struct {
	t        *testing.T
	r        *Reader
	w        *Writer
	port     uint16 // the kernel's end
	sport    uint16 // the peer's
	seq, ack uint32
}

func (p *tcpPeer) packet(flags byte, data, opts []byte) []byte {
	return buildTCP(peerAddr, localAddr, p.sport, p.port, p.seq, p.ack, flags, data, opts)
}

// send adds one segment to the Writer's batch (flushed when full).
func (p *tcpPeer) send(flags byte, data, opts []byte) {
	pkt := p.packet(flags, data, opts)
	p.seq += uint32(len(data))
	full, err := p.w.Add(pkt)
	if err != nil {
		p.t.Fatal(err)
	}
	if full {
		p.flush()
	}
}

func (p *tcpPeer) flush() {
	if n, err := p.w.Flush(); n > 0 {
		p.t.Fatalf("the kernel refused %d packets: %v", n, err)
	}
}

// next reads until a TCP packet to the peer that want accepts.
func (p *tcpPeer) next(deadline time.Time, want func(tcpHeader) bool) tcpHeader {
	for time.Now().Before(deadline) {
		batch, err := p.r.Read()
		if err != nil {
			p.t.Fatal(err)
		}
		for _, pkt := range batch {
			if h, _, ok := parseTCP(pkt); ok && h.dstPort == p.sport && want(h) {
				return h
			}
		}
	}
	p.t.Fatal("no answer from the kernel's TCP")
	return tcpHeader{}
}

type tcpHeader struct {
	srcPort, dstPort uint16
	seq, ack         uint32
	flags            byte
}

// parseTCP returns an IPv4 TCP packet's header and data.
func parseTCP(pkt []byte) (tcpHeader, []byte, bool) {
	if len(pkt) < 40 || pkt[0]>>4 != 4 || pkt[9] != 6 {
		return tcpHeader{}, nil, false
	}
	ihl := int(pkt[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(pkt[2:]))
	if total > len(pkt) || ihl+20 > total {
		return tcpHeader{}, nil, false
	}
	tcp := pkt[ihl:total]
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return tcpHeader{}, nil, false
	}
	return tcpHeader{
		srcPort: binary.BigEndian.Uint16(tcp[0:]), dstPort: binary.BigEndian.Uint16(tcp[2:]),
		seq: binary.BigEndian.Uint32(tcp[4:]), ack: binary.BigEndian.Uint32(tcp[8:]), flags: tcp[13],
	}, tcp[off:], true
}

func mssOption(mss uint16) []byte { return []byte{2, 4, byte(mss >> 8), byte(mss)} }

// buildTCP builds an IPv4 TCP packet with correct checksums.
func buildTCP(src, dst netip.Addr, sport, dport uint16, seq, ack uint32, flags byte, data, opts []byte) []byte {
	tl := 20 + len(opts)
	pkt := make([]byte, 20+tl+len(data))
	pkt[0], pkt[8], pkt[9] = 0x45, 64, 6
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	s4, d4 := src.As4(), dst.As4()
	copy(pkt[12:], s4[:])
	copy(pkt[16:], d4[:])
	binary.BigEndian.PutUint16(pkt[10:], ^onesSum(pkt[:20], 0))
	tcp := pkt[20:]
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], ack)
	tcp[12] = byte(tl/4) << 4
	tcp[13] = flags
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	copy(tcp[20:], opts)
	copy(tcp[tl:], data)
	binary.BigEndian.PutUint16(tcp[16:], ^onesSum(tcp, pseudoSum(pkt)))
	return pkt
}

func pseudoSum(pkt []byte) uint32 {
	var s uint32
	for i := 12; i < 20; i += 2 {
		s += uint32(binary.BigEndian.Uint16(pkt[i:]))
	}
	return s + 6 + uint32(len(pkt)-20)
}

func onesSum(b []byte, s uint32) uint16 {
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// tcpChecksumValid reports whether an IPv4 TCP packet's checksum is right.
func tcpChecksumValid(pkt []byte) bool {
	ihl := int(pkt[0]&0x0f) * 4
	var s uint32
	for i := 12; i < 20; i += 2 {
		s += uint32(binary.BigEndian.Uint16(pkt[i:]))
	}
	s += 6 + uint32(len(pkt)-ihl)
	return onesSum(pkt[ihl:], s) == 0xffff
}
