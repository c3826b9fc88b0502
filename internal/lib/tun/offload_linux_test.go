//go:build linux

package tun

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"net/netip"
	"os"
	"testing"
)

// tcpSegments builds n packets of one TCP flow (IPv4 or IPv6), payload size
// each (the last one last bytes), PSH on the last, with correct checksums and
// consecutive IPv4 IDs, each in a buffer with Headroom in front and room to
// join the whole run.
func tcpSegments(t *testing.T, v6 bool, n, size, last int) [][]byte {
	t.Helper()
	src, dst := netip.MustParseAddr("10.9.0.2"), netip.MustParseAddr("10.9.0.1")
	if v6 {
		src, dst = netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00::1")
	}
	var out [][]byte
	seq := uint32(5000)
	for i := range n {
		l := size
		if i == n-1 {
			l = last
		}
		data := make([]byte, l)
		_, _ = rand.Read(data)
		flags := byte(tcpFlagACK)
		if i == n-1 {
			flags |= tcpFlagPSH
		}
		var pkt []byte
		if v6 {
			pkt = buildTCP6(src, dst, 40000, 22, seq, 777, flags, data)
		} else {
			pkt = buildTCP(src, dst, 40000, 22, seq, 777, flags, data, nil)
			binary.BigEndian.PutUint16(pkt[4:], uint16(100+i))
			binary.BigEndian.PutUint16(pkt[10:], 0)
			binary.BigEndian.PutUint16(pkt[10:], ^onesSum(pkt[:20], 0))
		}
		seq += uint32(l)
		buf := make([]byte, Headroom+len(pkt), Headroom+n*(len(pkt)+60))
		copy(buf[Headroom:], pkt)
		out = append(out, buf)
	}
	return out
}

func buildTCP6(src, dst netip.Addr, sport, dport uint16, seq, ack uint32, flags byte, data []byte) []byte {
	pkt := make([]byte, 40+20+len(data))
	pkt[0] = 0x60
	binary.BigEndian.PutUint16(pkt[4:], uint16(20+len(data)))
	pkt[6], pkt[7] = 6, 64
	s, d := src.As16(), dst.As16()
	copy(pkt[8:], s[:])
	copy(pkt[24:], d[:])
	tcp := pkt[40:]
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], ack)
	tcp[12], tcp[13] = 5<<4, flags
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	copy(tcp[20:], data)
	binary.BigEndian.PutUint16(tcp[16:], ^fold(sum(tcp, pseudo(pkt, true, len(tcp)))))
	return pkt
}

// What WriteBatch joins, the kernel cuts again exactly as split does: a run
// joined and then split gives back every packet, byte for byte (IPv4: IDs,
// lengths and both checksums; IPv6: payload lengths and checksums).
func TestJoinThenSplitGivesThePackets(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		bufs := tcpSegments(t, v6, 20, 1200, 333)
		var want [][]byte
		for _, b := range bufs {
			want = append(want, bytes.Clone(b[Headroom:]))
		}
		var writes [][]byte
		joinBatch(bufs, Headroom, func(b []byte, _, _ int) { writes = append(writes, bytes.Clone(b)) })
		if len(writes) != 1 {
			t.Fatalf("v6=%v: 20 packets of one flow made %d writes, want 1", v6, len(writes))
		}
		var h vnetHdr
		h.decode(writes[0])
		if h.gsoSize != 1200 || h.flags != vnetFNeedsCsum {
			t.Fatalf("v6=%v: virtio-net header %+v", v6, h)
		}
		// The kernel would finish the checksum of each packet it cuts; split
		// computes them outright, from the pseudo-header sum in the field.
		out := make([][]byte, 32)
		for i := range out {
			out[i] = make([]byte, 1500)
		}
		sizes := make([]int, 32)
		n, err := split(writes[0], out, sizes, 0)
		if err != nil || n != 20 {
			t.Fatalf("v6=%v: split gave %d packets, %v", v6, n, err)
		}
		for i := range n {
			if got := out[i][:sizes[i]]; !bytes.Equal(got, want[i]) {
				t.Fatalf("v6=%v: packet %d after join and split:\n% x\nwant\n% x", v6, i, got[:60], want[i][:60])
			}
		}
	}
}

// What must not be joined is written alone, in order: another flow between
// two packets of one, a packet whose checksum is wrong, a gap in the
// sequence, a SYN, and a packet after one with PSH (which ends a run).
func TestJoinLeavesAlone(t *testing.T) {
	for name, mutate := range map[string]func([][]byte){
		"a wrong checksum": func(b [][]byte) { b[1][Headroom+50] ^= 0xff },
		"a gap in the sequence": func(b [][]byte) {
			p := b[1][Headroom:]
			binary.BigEndian.PutUint32(p[24:], binary.BigEndian.Uint32(p[24:])+1)
			binary.BigEndian.PutUint16(p[36:], 0)
			binary.BigEndian.PutUint16(p[36:], ^fold(sum(p[20:], pseudo(p, false, len(p)-20))))
		},
		"PSH on the first": func(b [][]byte) {
			p := b[0][Headroom:]
			p[33] |= tcpFlagPSH
			binary.BigEndian.PutUint16(p[36:], 0)
			binary.BigEndian.PutUint16(p[36:], ^fold(sum(p[20:], pseudo(p, false, len(p)-20))))
		},
		"a SYN": func(b [][]byte) {
			p := b[1][Headroom:]
			p[33] |= tcpFlagSYN
			binary.BigEndian.PutUint16(p[36:], 0)
			binary.BigEndian.PutUint16(p[36:], ^fold(sum(p[20:], pseudo(p, false, len(p)-20))))
		},
	} {
		bufs := tcpSegments(t, false, 3, 1000, 1000)
		mutate(bufs)
		var writes int
		joinBatch(bufs, Headroom, func([]byte, int, int) { writes++ })
		if writes < 2 {
			t.Errorf("%s: the run was joined into %d write", name, writes)
		}
	}
	// Two flows interleaved: nothing joins, nothing is reordered.
	a, b := tcpSegments(t, false, 2, 800, 800), tcpSegments(t, true, 2, 800, 800)
	bufs := [][]byte{a[0], b[0], a[1], b[1]}
	var order []byte
	joinBatch(bufs, Headroom, func(w []byte, _, _ int) { order = append(order, w[Headroom]>>4) })
	if string(order) != string([]byte{4, 6, 4, 6}) {
		t.Fatalf("interleaved flows written as IP versions %v, want 4 6 4 6", order)
	}
}

// Bad segments from a read are errors, never a panic: shorter than the
// virtio-net header, a TCP segment whose IP header runs past it, a GSO type
// the device did not offer, a checksum offset beyond the packet, and a
// segment of more packets than the buffers.
func TestSplitRefusesBadReads(t *testing.T) {
	out := [][]byte{make([]byte, 1500), make([]byte, 1500)}
	sizes := make([]int, 2)
	hdr := func(h vnetHdr, pkt []byte) []byte {
		b := make([]byte, vnetHdrLen+len(pkt))
		h.encode(b)
		copy(b[vnetHdrLen:], pkt)
		return b
	}
	seg := tcpSegments(t, false, 1, 3000, 3000)[0][Headroom:]
	for name, in := range map[string][]byte{
		"5 bytes":                   make([]byte, 5),
		"an IP header past the end": hdr(vnetHdr{gsoType: vnetGSOTCPv4, gsoSize: 1000, csumStart: 60}, seg[:50]),
		"GSO type UDP":              hdr(vnetHdr{gsoType: 3, gsoSize: 1000, csumStart: 20}, seg),
		"a checksum beyond":         hdr(vnetHdr{flags: vnetFNeedsCsum, csumStart: 20, csumOffset: 5000}, seg),
		"three packets for two":     hdr(vnetHdr{gsoType: vnetGSOTCPv4, gsoSize: 1000, csumStart: 20, csumOffset: 16}, seg),
	} {
		if n, err := split(in, out, sizes, 0); err == nil {
			t.Errorf("%s: split gave %d packets and no error", name, n)
		}
	}
}

// What a Writer wrote is counted per packet once the kernel took it, and
// a refused write counts every packet it held, a segment of several joined
// ones too (bad input: a device whose writes all fail).
func TestWriterCountsPackets(t *testing.T) {
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	r, broken, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close() // writes fail: EPIPE
	defer broken.Close()
	for _, tc := range []struct {
		what    string
		f       *os.File
		refused int
	}{{"taken", null, 0}, {"refused", broken, 5}} {
		w := (&Device{f: tc.f, name: "test"}).NewWriter(1500)
		var bytes int64
		for _, b := range tcpSegments(t, false, 5, 1200, 7) { // one flow: one joined write
			bytes += int64(len(b) - Headroom)
			if _, err := w.Add(b[Headroom:]); err != nil {
				t.Fatal(err)
			}
		}
		refused, err := w.Flush()
		if refused != tc.refused || (err != nil) != (tc.refused > 0) {
			t.Fatalf("%s: Flush refused %d (%v), want %d", tc.what, refused, err, tc.refused)
		}
		want := WriteCounts{Refused: int64(tc.refused)}
		if tc.refused == 0 {
			want.Packets, want.Bytes = 5, bytes
		}
		if got := w.TakeCounts(); got != want {
			t.Fatalf("%s: counts %+v, want %+v", tc.what, got, want)
		}
		if got := w.TakeCounts(); got != (WriteCounts{}) {
			t.Fatalf("%s: counts taken twice: %+v", tc.what, got)
		}
	}
}
