package udpgro_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
	"unsafe"

	"github.com/quic-go/quic-go"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/tp-proxy/tp/internal/lib/udpgro"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

func listen(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func setsockopt(t *testing.T, c *net.UDPConn, level, opt, v int) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, v) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatalf("setsockopt(%d, %d): %v", level, opt, serr)
	}
}

// sendSegmented sends payload as one system call that the kernel cuts into
// datagrams of size bytes (UDP_SEGMENT), as quic-go's GSO sends do.
func sendSegmented(t *testing.T, from *net.UDPConn, to net.Addr, payload []byte, size int) {
	t.Helper()
	oob := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.IPPROTO_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], uint16(size))
	if _, _, err := from.WriteMsgUDP(payload, oob, to.(*net.UDPAddr)); err != nil {
		t.Fatalf("segmented send of %d bytes in %d-byte datagrams: %v", len(payload), size, err)
	}
}

func messages(n, size int) []ipv4.Message {
	ms := make([]ipv4.Message, n)
	for i := range ms {
		ms[i].Buffers = [][]byte{make([]byte, size)}
		ms[i].OOB = make([]byte, 128)
	}
	return ms
}

// tosOf is the TOS byte among a packet's control messages, and whether a
// UDP_GRO message is still among them (it must not be).
func tosOf(t *testing.T, oob []byte) (tos int, gro bool) {
	t.Helper()
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		t.Fatalf("the control messages handed out do not parse: %v", err)
	}
	tos = -1
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_TOS && len(m.Data) >= 1:
			tos = int(m.Data[0])
		case m.Header.Level == unix.IPPROTO_UDP && m.Header.Type == unix.UDP_GRO:
			gro = true
		}
	}
	return tos, gro
}

// A burst sent as one segmented write comes back as its datagrams, in order,
// whole, each with the burst's TOS byte and sender, across calls that take
// fewer messages than the burst holds; a lone datagram after it stays one.
func TestReaderSplitsCoalescedReads(t *testing.T) {
	rx, tx := listen(t), listen(t)
	setsockopt(t, rx, unix.IPPROTO_IP, unix.IP_RECVTOS, 1)
	setsockopt(t, tx, unix.IPPROTO_IP, unix.IP_TOS, 0x02) // ECT(0), as quic-go marks
	r := udpgro.NewReader(rx)
	if !r.Coalescing() {
		t.Fatal("the kernel refused UDP_GRO (Linux has it since 5.0)")
	}

	const size, count = 1200, 11
	burst := make([]byte, size*(count-1)+500) // the last datagram is shorter
	for i := range burst {
		burst[i] = byte(i / size)
	}
	sendSegmented(t, tx, rx.LocalAddr(), burst, size)
	if _, err := tx.WriteTo([]byte("lone"), rx.LocalAddr()); err != nil {
		t.Fatal(err)
	}

	_ = rx.SetReadDeadline(time.Now().Add(10 * time.Second))
	var got [][]byte
	ms := messages(3, 1452)
	for len(got) < count+1 {
		n, err := r.ReadBatch(ms, 0)
		if err != nil {
			t.Fatalf("after %d packets: %v", len(got), err)
		}
		for _, m := range ms[:n] {
			if m.Flags != 0 {
				t.Fatalf("packet %d: flags %#x", len(got), m.Flags)
			}
			if a := m.Addr.(*net.UDPAddr); a.Port != tx.LocalAddr().(*net.UDPAddr).Port {
				t.Fatalf("packet %d came from %v, not the sender %v", len(got), a, tx.LocalAddr())
			}
			tos, gro := tosOf(t, m.OOB[:m.NN])
			if len(got) < count && tos != 0x02 {
				t.Fatalf("packet %d: TOS %#x, sent with 0x02", len(got), tos)
			}
			if gro {
				t.Fatalf("packet %d still carries the UDP_GRO control message", len(got))
			}
			got = append(got, bytes.Clone(m.Buffers[0][:m.N]))
		}
	}
	for i := range count {
		want := burst[i*size : min((i+1)*size, len(burst))]
		if !bytes.Equal(got[i], want) {
			t.Fatalf("datagram %d: %d bytes starting %x, want %d bytes of %x", i, len(got[i]), got[i][:1], len(want), want[:1])
		}
	}
	if string(got[count]) != "lone" {
		t.Fatalf("the lone datagram came back as %q", got[count])
	}
	st := r.Stats()
	if st.Coalesced == 0 || st.Packets != count+1 {
		t.Fatalf("stats %+v: want a coalesced read and %d packets", st, count+1)
	}
}

// A packet longer than the caller's buffer is handed out cut, with MSG_TRUNC,
// as the kernel reports a datagram longer than the buffer; the next packet is
// whole.
func TestReaderMarksTruncation(t *testing.T) {
	rx, tx := listen(t), listen(t)
	r := udpgro.NewReader(rx)
	sendSegmented(t, tx, rx.LocalAddr(), bytes.Repeat([]byte{7}, 1300+900), 1300)
	_ = rx.SetReadDeadline(time.Now().Add(10 * time.Second))
	ms := messages(1, 1000)
	for i, want := range []struct{ n, flags int }{{1000, unix.MSG_TRUNC}, {900, 0}} {
		if n, err := r.ReadBatch(ms, 0); err != nil || n != 1 {
			t.Fatalf("read %d: %d, %v", i, n, err)
		}
		if ms[0].N != want.n || ms[0].Flags != want.flags {
			t.Fatalf("read %d: %d bytes, flags %#x; want %d, %#x", i, ms[0].N, ms[0].Flags, want.n, want.flags)
		}
	}
}

// Control messages that do not fit the caller's buffer are left out whole,
// with MSG_CTRUNC, as the kernel does: one cut in half would not parse.
func TestReaderKeepsControlMessagesWhole(t *testing.T) {
	rx, tx := listen(t), listen(t)
	setsockopt(t, rx, unix.IPPROTO_IP, unix.IP_RECVTOS, 1)
	setsockopt(t, rx, unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
	r := udpgro.NewReader(rx)
	sendSegmented(t, tx, rx.LocalAddr(), bytes.Repeat([]byte{1}, 2400), 1200)
	_ = rx.SetReadDeadline(time.Now().Add(10 * time.Second))
	ms := messages(1, 1500)
	// Room for the packet information's message (the kernel's first) and a
	// few bytes of the TOS byte's.
	ms[0].OOB = make([]byte, unix.CmsgSpace(unix.SizeofInet4Pktinfo)+8)
	if n, err := r.ReadBatch(ms, 0); err != nil || n != 1 {
		t.Fatalf("read: %d, %v", n, err)
	}
	if ms[0].Flags&unix.MSG_CTRUNC == 0 || ms[0].NN != unix.CmsgSpace(unix.SizeofInet4Pktinfo) {
		t.Fatalf("%d bytes of control messages, flags %#x; want the packet information's %d and MSG_CTRUNC", ms[0].NN, ms[0].Flags, unix.CmsgSpace(unix.SizeofInet4Pktinfo))
	}
	if msgs, err := unix.ParseSocketControlMessage(ms[0].OOB[:ms[0].NN]); err != nil || len(msgs) != 1 || msgs[0].Header.Type != unix.IP_PKTINFO {
		t.Fatalf("the control messages handed out: %v, %v; want the packet information's alone", msgs, err)
	}
}

// quic-go reads a wrapped socket through its ReadBatch: a transfer of 8 MiB
// between two wrapped sockets arrives whole, and the receiver's reads were
// coalesced (quic-go sends with GSO on loopback).
func TestQUICThroughWrap(t *testing.T) {
	ca := testpki.New(t)
	srvConn, cliConn := udpgro.Wrap(listen(t)), udpgro.Wrap(listen(t))
	srv, ok := srvConn.(*udpgro.Conn)
	if !ok {
		t.Fatal("Wrap did not turn coalescing on")
	}
	str := &quic.Transport{Conn: srvConn}
	defer str.Close()
	ln, err := str.Listen(&tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "127.0.0.1")}, NextProtos: []string{"t"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	const size = 8 << 20
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	want := sha256.Sum256(payload)
	got := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept(ctx)
		if err != nil {
			got <- [32]byte{}
			return
		}
		s, err := c.AcceptStream(ctx)
		if err != nil {
			got <- [32]byte{}
			return
		}
		h := sha256.New()
		_, _ = io.Copy(h, s)
		got <- [32]byte(h.Sum(nil))
		_ = c.CloseWithError(0, "")
	}()

	ctr := &quic.Transport{Conn: cliConn}
	defer ctr.Close()
	c, err := ctr.Dial(ctx, srvConn.LocalAddr(), &tls.Config{RootCAs: ca.Pool, NextProtos: []string{"t"}, ServerName: "127.0.0.1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write(payload); err != nil {
		t.Fatal(err)
	}
	_ = s.Close()
	select {
	case h := <-got:
		if h != want {
			t.Fatal("the 8 MiB sent over QUIC arrived changed or cut")
		}
	case <-ctx.Done():
		t.Fatal("the transfer did not finish within a minute")
	}
	st := srv.Reader().Stats()
	t.Logf("receiver: %+v", st)
	if st.Coalesced == 0 {
		t.Fatalf("the receiver's reads were never coalesced: %+v", st)
	}
}
