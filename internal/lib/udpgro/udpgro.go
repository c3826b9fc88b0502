package udpgro

import (
	"net"
	"sync/atomic"

	"golang.org/x/net/ipv4"
)

const (
	// batch is how many coalesced reads one system call may return, as
	// quic-go's own batch of reads (8 on Linux).
	batch = 8
	// bufSize holds the largest coalesced read: the kernel joins at most an
	// IP packet's worth (64 KiB) and truncates what a buffer cannot hold.
	bufSize = 1 << 16
	// oobSize holds the control messages quic-go turns on (the TOS or
	// traffic class byte, the packet information of both families on a
	// dual-stack socket) and the segment size, 120 bytes at most, with room.
	oobSize = 256
)

// Reader reads a UDP socket in batches, with coalescing where the kernel
// offers it. It is not safe for concurrent ReadBatch calls (quic-go makes
// them from one goroutine).
type Reader struct {
	conn *ipv4.PacketConn
	gro  bool

	msgs []ipv4.Message // the coalesced reads of the last system call
	// segs are the packets of msgs not yet handed out, in order.
	segs []segment
	next int

	reads, coalesced, packets atomic.Int64
}

// segment is one packet of a coalesced read: msgs[msg].Buffers[0][off:end].
type segment struct {
	msg, off, end int
}

// NewReader returns a Reader of udp, and turns coalescing on for the socket
// where it can. The caller keeps udp (and closes it). The buffers (8 × 64
// KiB) are allocated at the first read: a socket that never reads costs
// nothing.
func NewReader(udp *net.UDPConn) *Reader {
	return &Reader{conn: ipv4.NewPacketConn(udp), gro: enableGRO(udp)}
}

// Buffered is how many packets of the last coalesced reads the Reader still
// holds: the next ReadBatch hands them out without reading the socket.
func (r *Reader) Buffered() int { return len(r.segs) - r.next }

// Coalescing reports whether the kernel joins datagrams for this Reader.
func (r *Reader) Coalescing() bool { return r.gro }

// Stats are a Reader's counts: system calls that returned datagrams, the
// buffers they returned that held more than one packet (a call returns up
// to 8), and packets handed out.
type Stats struct{ Reads, Coalesced, Packets int64 }

// Stats returns the Reader's counts so far.
func (r *Reader) Stats() Stats {
	return Stats{Reads: r.reads.Load(), Coalesced: r.coalesced.Load(), Packets: r.packets.Load()}
}

// ReadBatch fills ms with received datagrams, one packet each, and returns how
// many it filled, as ipv4.PacketConn.ReadBatch does: each message's first
// buffer gets the packet (MSG_TRUNC in Flags when it does not fit), OOB the
// read's control messages but the segment size, Addr the sender. Packets of a
// coalesced read that do not fit in ms are handed out by the next calls,
// before the socket is read again.
func (r *Reader) ReadBatch(ms []ipv4.Message, flags int) (int, error) {
	if !r.gro {
		n, err := r.conn.ReadBatch(ms, flags)
		if n > 0 {
			r.reads.Add(1)
			r.packets.Add(int64(n))
		}
		return n, err
	}
	if r.next == len(r.segs) {
		if err := r.fill(flags); err != nil {
			return 0, err
		}
	}
	n := 0
	for n < len(ms) && r.next < len(r.segs) {
		s := r.segs[r.next]
		r.next++
		src := r.msgs[s.msg]
		m := &ms[n]
		m.N = copy(m.Buffers[0], src.Buffers[0][s.off:s.end])
		m.Flags = 0
		if m.N < s.end-s.off {
			m.Flags = truncated
		}
		cut := false
		if src.NN <= len(m.OOB) { // quic-go's room always fits: no parse per packet
			m.NN = copy(m.OOB, src.OOB[:src.NN])
		} else {
			m.NN, cut = copyControl(m.OOB, src.OOB[:src.NN])
		}
		if cut || src.Flags&ctruncated != 0 {
			m.Flags |= ctruncated
		}
		m.Addr = src.Addr
		n++
	}
	r.packets.Add(int64(n))
	return n, nil
}

// fill reads the next batch of coalesced reads and cuts them into segs.
func (r *Reader) fill(flags int) error {
	if r.msgs == nil {
		r.msgs = make([]ipv4.Message, batch)
		for i := range r.msgs {
			r.msgs[i].Buffers = [][]byte{make([]byte, bufSize)}
			r.msgs[i].OOB = make([]byte, oobSize)
		}
		r.segs = make([]segment, 0, batch*4)
	}
	r.segs, r.next = r.segs[:0], 0
	for len(r.segs) == 0 {
		n, err := r.conn.ReadBatch(r.msgs, flags)
		if err != nil {
			return err
		}
		r.reads.Add(1)
		for i := range n {
			m := &r.msgs[i]
			size, nn := takeSegmentSize(m.OOB[:m.NN])
			m.NN = nn
			if size <= 0 || size >= m.N {
				r.segs = append(r.segs, segment{i, 0, m.N})
				continue
			}
			r.coalesced.Add(1)
			for off := 0; off < m.N; off += size {
				r.segs = append(r.segs, segment{i, off, min(off+size, m.N)})
			}
		}
	}
	return nil
}

// Conn is a *net.UDPConn whose reads go through a Reader: quic-go reads it
// with ReadBatch, and the single reads ReadFrom and ReadMsgUDP hand out the
// same packets. The UDPConn's other reads (Read, ReadFromUDP,
// ReadMsgUDPAddrPort) would bypass the Reader and return bursts unsplit: use
// none of them.
type Conn struct {
	*net.UDPConn
	r *Reader
}

// Wrap returns udp with a Reader behind its reads where the kernel coalesces
// for it, and udp itself where it does not.
func Wrap(udp *net.UDPConn) net.PacketConn {
	r := NewReader(udp)
	if !r.gro {
		return udp
	}
	return NewConn(udp, r)
}

// NewConn returns udp with r, a Reader of udp, behind its reads.
func NewConn(udp *net.UDPConn, r *Reader) *Conn { return &Conn{UDPConn: udp, r: r} }

// Reader returns the Conn's Reader.
func (c *Conn) Reader() *Reader { return c.r }

// ReadBatch is Reader.ReadBatch.
func (c *Conn) ReadBatch(ms []ipv4.Message, flags int) (int, error) { return c.r.ReadBatch(ms, flags) }

// ReadMsgUDP reads one packet.
func (c *Conn) ReadMsgUDP(b, oob []byte) (n, oobn, flags int, addr *net.UDPAddr, err error) {
	ms := []ipv4.Message{{Buffers: [][]byte{b}, OOB: oob}}
	if _, err = c.r.ReadBatch(ms, 0); err != nil {
		return 0, 0, 0, nil, err
	}
	addr, _ = ms[0].Addr.(*net.UDPAddr)
	return ms[0].N, ms[0].NN, ms[0].Flags, addr, nil
}

// ReadFrom reads one packet.
func (c *Conn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, _, _, addr, err := c.ReadMsgUDP(b, nil)
	if err != nil {
		return 0, nil, err
	}
	return n, addr, nil
}
