// Package direct carries the end-to-end QUIC connection between a dialer and
// a protected name's agent (docs/PROTOCOL.md, section 11.4.2): a Path is the
// packet path quic-go sees, one constant peer address, under which the packets
// go over the relay (a stream through the TP server) until ICE finds a direct
// path between the two devices, move to that path, and back to the relay when
// it dies. QUIC's own loss recovery carries what was in flight across a switch,
// so no stream is reset and no byte lost. The relay stream also stands for the
// TP server's consent: when it ends, or is silent for Silence, the pair ends.
//
// The package knows nothing of tp's dialer or agent; ICE (pion/ice) and the
// signalling over the QUIC connection are in ice.go.
package direct

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Marker and Version open a direct-path session on the relay stream, in
// place of the inner TLS handshake of a protected session: the dialer writes
// them first, the agent answers Marker, Version (it takes it) or Marker,
// Refused (it does not).
const (
	Marker  byte = 0x01
	Version byte = 0x01
	Refused byte = 0x00
)

// Frame types on the relay stream: type (1 byte), length (2 bytes, big
// endian), payload.
const (
	framePacket byte = 0x01 // one QUIC packet
	framePing   byte = 0x02 // empty: the sender is alive and hears the server
)

// MaxPacket is the largest QUIC packet a relay frame carries (what quic-go
// reads at most) and the size the pair's QUIC sends (its own path MTU
// discovery is off: it would measure the relay, which has no MTU). SmallPacket
// is what the direct path is taken to carry without a check; larger packets
// go on it once a probe of MaxPacket bytes came through (see probeMTU), and
// on the relay until then.
const (
	MaxPacket   = 1452
	SmallPacket = 1280
	// SmallPacket6 is SmallPacket over IPv6, whose guaranteed MTU (1280)
	// holds 1232 bytes of UDP payload.
	SmallPacket6 = 1232
)

// smallFor is the size the direct path to ap carries without a probe.
func smallFor(ap netip.AddrPort) int {
	if ap.Addr().Is6() {
		return SmallPacket6
	}
	return SmallPacket
}

// The direct path's size check: a probe of MaxPacket bytes, sent again after
// probeFirst, twice as long each time up to probeFast, until one is answered
// (at most probeTries in a row), then every probeSlow; a path that carried
// probes and misses probeMisses in a row no longer takes large packets.
const (
	probeFirst  = 50 * time.Millisecond
	probeFast   = time.Second
	probeSlow   = 15 * time.Second
	probeTries  = 8
	probeMisses = 3
)

// Probe packets on the direct path: the first byte 0x80 (a QUIC long header
// without its fixed bit: neither QUIC nor STUN), "TPmt", the kind, an 8-byte
// nonce; a probe is padded to MaxPacket bytes, its answer is not.
const (
	probeLen    = 14
	probeKind   = 0x01
	answerKind  = 0x02
	probeMarker = 0x80
)

var probeMagic = [4]byte{'T', 'P', 'm', 't'}

// PingEvery and Silence: each end writes a ping on the relay stream every
// PingEvery, and ends the pair when it has read nothing from it for Silence
// (the TP server is gone, or no longer relays: a revocation reaches both ends
// as the end of that stream, or as this silence).
const (
	PingEvery = 5 * time.Second
	Silence   = 15 * time.Second
)

// DeadAfter is how long a direct path may take packets without one coming
// back (at least deadPackets of them) before the Path sends on the relay
// again; it tries the direct path again after a back-off from directRetry up to
// directRetryMax.
const (
	DeadAfter      = 2 * time.Second
	deadPackets    = 4
	directRetry    = 2 * time.Second
	directRetryMax = time.Minute
)

const (
	inQueue  = 1024 // packets read and not yet taken by QUIC
	inReads  = 64   // coalesced reads (several packets each) not yet taken by QUIC
	outQueue = 512  // packets waiting for the relay stream
)

// ErrRefused: the agent answered the marker without taking a direct path.
var ErrRefused = errors.New("the agent does not take direct paths")

// ErrRelayEnded: the relay stream ended cleanly (the other end closed the
// pair, or the server's session ended without a code).
var ErrRelayEnded = errors.New("the TP server or the other end ended the relayed session")

// ErrSilent ends a pair whose relay stream said nothing for Silence.
var ErrSilent = fmt.Errorf("no word from the TP server for %s: the direct path ends with the relayed session that authorises it", Silence)

type addr string

func (a addr) Network() string { return "tp-direct" }
func (a addr) String() string  { return string(a) }

// Stats counts a Path's packets by the way they went.
type Stats struct {
	RelayOut, RelayIn, DirectOut, DirectIn int64
	// Dropped: packets the relay's queue or QUIC's input queue could not take
	// (QUIC sends them again, as for a loss).
	Dropped int64
	// ToDirect and ToRelay count the switches of the sending side.
	ToDirect, ToRelay int64
	// LargeOnRelay: packets above SmallPacket sent on the relay while the
	// direct path was up, because it had not carried a probe of their size.
	LargeOnRelay int64
	// LargeDirect says whether the direct path carries packets of MaxPacket
	// bytes (its probe came through).
	LargeDirect bool
}

// Path is a net.PacketConn for quic-go whose packets go over a relay stream
// or a direct path, whichever is alive.
type Path struct {
	relay net.Conn
	br    *bufio.Reader
	in    chan []byte  // single packets, from the relay or the socket
	inr   chan *rxRead // coalesced reads from the socket
	curMu sync.Mutex
	cur   *rxRead // the read QUIC takes packets from now
	out   chan []byte
	ping  chan struct{}

	mu        sync.Mutex
	udp       *net.UDPConn   // the socket ICE found the direct path on, or nil
	remote    netip.AddrPort // the other end's address on it, once ICE selected a pair
	iceUp     bool           // ICE says the selected pair is connected
	sq        sendQueue      // packets for the direct path, to writeUDP
	wrote     chan struct{}  // writeUDP ended (or never ran)
	badUntil  time.Time      // the direct path failed to carry packets; relay until then
	retry     time.Duration
	pending   time.Time // first packet on the direct path since one came back
	pendingN  int
	lastSend  time.Time // the last packet on the direct path
	onDirect  bool      // where the last packet went
	onSwitch  func(direct bool)
	lastHeard atomic.Int64 // unix nanoseconds of the relay's last frame

	large     bool          // the direct path to remote carried a probe of MaxPacket bytes
	probeOut  uint64        // the nonce of the probe not yet answered, or 0
	recent    [4]uint64     // the last probes' nonces: an answer to any of them counts
	probeMiss int           // probes in a row not answered
	probeKick chan struct{} // the direct path came up or moved: check its size now
	probeSent time.Time     // when the last probe went
	// heard is the last probe from an address that is not (yet) the other
	// end's on the direct path, answered if SetDirect names it: ICE may tell
	// one end its pair after the other end's first probe arrived.
	heard     [probeLen]byte
	heardFrom netip.AddrPort

	rdMu      sync.Mutex
	rdCh      chan struct{}
	rdTimer   *time.Timer
	rdFired   bool          // rdCh is closed
	rdGen     uint64        // which SetReadDeadline a timer belongs to
	done      chan struct{} // the relay ended
	doneOnce  sync.Once
	err       error
	closed    chan struct{} // Close was called: quic-go's reads end
	closeOnce sync.Once
	finish    chan struct{} // CloseRelay: write what is queued, then end the stream
	finished  chan struct{}
	finOnce   sync.Once

	relayOut, relayIn, directOut, directIn, dropped, toDirect, toRelay, largeOnRelay atomic.Int64
}

var pool = sync.Pool{New: func() any { b := make([]byte, MaxPacket); return &b }}

// NewPath runs a Path over relay, a stream through the TP server whose
// opening (Marker, Version) was written. expect, when not empty, is what the
// other end must answer first (the dialer's side: Marker, Version); anything
// else ends the Path with ErrRefused.
func NewPath(relay net.Conn, expect []byte) *Path {
	p := &Path{
		relay:    relay,
		br:       bufio.NewReaderSize(relay, 64<<10),
		in:       make(chan []byte, inQueue),
		inr:      make(chan *rxRead, inReads),
		out:      make(chan []byte, outQueue),
		ping:     make(chan struct{}, 1),
		rdCh:     make(chan struct{}),
		done:     make(chan struct{}),
		closed:   make(chan struct{}),
		finish:   make(chan struct{}),
		finished: make(chan struct{}),
		wrote:    make(chan struct{}),
		retry:    directRetry,

		probeKick: make(chan struct{}, 1),
	}
	p.sq.init()
	p.lastHeard.Store(time.Now().UnixNano())
	go p.readRelay(expect)
	go p.writeRelay()
	return p
}

// OnSwitch, when set before packets flow, is told each time the sending side
// moves to the direct path (true) or back to the relay (false).
func (p *Path) OnSwitch(f func(direct bool)) {
	p.mu.Lock()
	p.onSwitch = f
	p.mu.Unlock()
}

// AttachUDP gives the Path the UDP socket ICE runs on: the Path reads it,
// hands STUN messages (RFC 7983: the first two bits zero) to stun and takes
// the rest as QUIC packets. The socket's owner closes it.
func (p *Path) AttachUDP(udp *net.UDPConn, stun func(b []byte, from netip.AddrPort)) {
	p.mu.Lock()
	p.udp = udp
	p.mu.Unlock()
	gso, gro := offload(udp)
	go p.readUDP(udp, stun, gro)
	go p.writeUDP(udp, gso)
	go p.probeMTU(udp)
}

// flushed waits (a moment at most) until what the Path queued for the direct
// path went out, after Close: then its socket may close.
func (p *Path) flushed() {
	p.mu.Lock()
	attached := p.udp != nil
	p.mu.Unlock()
	if !attached {
		return
	}
	select {
	case <-p.wrote:
	case <-time.After(200 * time.Millisecond):
	}
}

// SetDirect says where the other end is on the UDP socket: the remote address
// of the candidate pair ICE selected. Packets go there while ICE holds it
// connected (SetICEUp).
func (p *Path) SetDirect(remote netip.AddrPort) {
	p.mu.Lock()
	if p.remote != remote {
		p.pending, p.pendingN = time.Time{}, 0
		p.large, p.probeOut, p.probeMiss, p.recent = false, 0, 0, [4]uint64{}
		p.kickProbe()
	}
	p.remote = remote
	p.switchLocked(time.Now())
	udp, heard := p.udp, p.heard
	answer := p.heardFrom == remote && udp != nil
	p.heardFrom = netip.AddrPort{}
	p.mu.Unlock()
	if answer {
		answerProbe(udp, heard[:], remote)
	}
}

func (p *Path) kickProbe() {
	select {
	case p.probeKick <- struct{}{}:
	default:
	}
}

// SetICEUp says whether ICE holds the direct path as connected (a consent
// check failed: false; it came back: true).
func (p *Path) SetICEUp(up bool) {
	p.mu.Lock()
	p.iceUp = up
	if up {
		p.badUntil = time.Time{}
		p.retry = directRetry
	}
	p.switchLocked(time.Now())
	p.mu.Unlock()
}

// Direct says whether the Path sends on the direct path now.
func (p *Path) Direct() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.useDirectLocked(time.Now())
}

// Stats are the Path's counts so far.
func (p *Path) Stats() Stats {
	p.mu.Lock()
	large := p.large
	p.mu.Unlock()
	return Stats{RelayOut: p.relayOut.Load(), RelayIn: p.relayIn.Load(), DirectOut: p.directOut.Load(),
		DirectIn: p.directIn.Load(), Dropped: p.dropped.Load(), ToDirect: p.toDirect.Load(), ToRelay: p.toRelay.Load(),
		LargeOnRelay: p.largeOnRelay.Load(), LargeDirect: large}
}

// Done is closed when the relay ended; Err then says why. The direct path
// still carries packets (a CONNECTION_CLOSE saying why) until Close.
func (p *Path) Done() <-chan struct{} { return p.done }

// Err is why the relay ended (nil while it runs, net.ErrClosed after Close).
func (p *Path) Err() error {
	select {
	case <-p.done:
		return p.err
	default:
		return nil
	}
}

func (p *Path) fail(err error) {
	p.doneOnce.Do(func() {
		p.err = err
		close(p.done)
		_ = p.relay.Close()
	})
}

// Close ends the Path and closes the relay stream.
func (p *Path) Close() error {
	p.fail(net.ErrClosed)
	p.closeOnce.Do(func() {
		p.sq.close() // first: nothing is queued after writeUDP's last take
		close(p.closed)
	})
	return nil
}

// SetReadBuffer and SetWriteBuffer are for quic-go, which sizes a UDP
// socket's buffers: the Path has queues of its own.
func (p *Path) SetReadBuffer(int) error  { return nil }
func (p *Path) SetWriteBuffer(int) error { return nil }

// CloseRelay ends the relay stream cleanly: what is queued (the connection's
// CONNECTION_CLOSE, over a relayed pair) is written first, then a half-close,
// so that the other end reads why rather than a cut; then the Path ends.
func (p *Path) CloseRelay() {
	p.finOnce.Do(func() { close(p.finish) })
	select {
	case <-p.finished:
	case <-p.done:
	case <-time.After(time.Second):
	}
	_ = p.Close()
}

// rxRead is one coalesced read of the socket (GRO): n bytes of QUIC packets
// of seg bytes each (the last may be shorter), which ReadFrom hands to QUIC one
// by one from where they lie.
type rxRead struct {
	buf         []byte
	n, seg, off int
}

var rxPool = sync.Pool{New: func() any { return &rxRead{buf: make([]byte, 64<<10)} }}

// ReadFrom hands quic-go the next packet, from either path.
func (p *Path) ReadFrom(b []byte) (int, net.Addr, error) {
	p.curMu.Lock()
	defer p.curMu.Unlock()
	if p.cur == nil {
		p.rdMu.Lock()
		dl := p.rdCh
		p.rdMu.Unlock()
		select {
		case pk := <-p.in:
			n := copy(b, pk)
			pool.Put(&pk)
			return n, peerAddr, nil
		case r := <-p.inr:
			p.cur = r
		case <-p.closed:
			return 0, nil, net.ErrClosed
		case <-dl:
			return 0, nil, os.ErrDeadlineExceeded
		}
	}
	r := p.cur
	end := min(r.off+r.seg, r.n)
	n := copy(b, r.buf[r.off:end])
	if r.off = end; r.off >= r.n {
		p.cur = nil
		rxPool.Put(r)
	}
	return n, peerAddr, nil
}

var peerAddr = addr("other-device")

// WriteTo sends a packet on the direct path when it is alive, else on the relay.
func (p *Path) WriteTo(b []byte, _ net.Addr) (int, error) {
	select {
	case <-p.closed:
		return 0, net.ErrClosed
	default:
	}
	if len(b) > MaxPacket {
		return 0, fmt.Errorf("tp direct: a packet of %d bytes; at most %d", len(b), MaxPacket)
	}
	if p.sendDirect(len(b)) {
		if p.sq.add(b) {
			p.directOut.Add(1)
		}
		return len(b), nil
	}
	select {
	case <-p.done:
		return len(b), nil // no relay: lost, as on a dead link
	default:
	}
	bp := pool.Get().(*[]byte)
	pk := append((*bp)[:0], b...)
	select {
	case p.out <- pk:
		p.relayOut.Add(1)
	default:
		pool.Put(bp)
		p.dropped.Add(1) // a full queue: QUIC sees a loss and slows down
	}
	return len(b), nil
}

// sendDirect says whether a packet of size bytes goes on the direct path now,
// keeping the count that tells a dead path.
func (p *Path) sendDirect(size int) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if !p.pending.IsZero() && now.Sub(p.lastSend) > DeadAfter {
		// A burst after a quiet spell: what went before it (an ACK that
		// needs no answer) says nothing about the path.
		p.pending, p.pendingN = time.Time{}, 0
	}
	if p.useDirectLocked(now) && !p.pending.IsZero() && p.pendingN >= deadPackets && now.Sub(p.pending) > DeadAfter {
		p.markBadLocked(now)
	}
	if !p.switchLocked(now) {
		return false
	}
	if size > smallFor(p.remote) && !p.large {
		p.largeOnRelay.Add(1)
		return false
	}
	if p.pending.IsZero() {
		p.pending = now
	}
	p.pendingN++
	p.lastSend = now
	return true
}

func (p *Path) useDirectLocked(now time.Time) bool {
	return p.udp != nil && p.remote.IsValid() && p.iceUp && !now.Before(p.badUntil)
}

// switchLocked decides where packets go now, counts and reports a change, and
// says whether it is the direct path.
func (p *Path) switchLocked(now time.Time) bool {
	use := p.useDirectLocked(now)
	if use != p.onDirect {
		p.onDirect = use
		if use {
			p.toDirect.Add(1)
			p.kickProbe()
		} else {
			p.toRelay.Add(1)
		}
		if p.onSwitch != nil {
			go p.onSwitch(use)
		}
	}
	return use
}

func (p *Path) markBad() {
	p.mu.Lock()
	p.markBadLocked(time.Now())
	p.switchLocked(time.Now())
	p.mu.Unlock()
}

// markBadLocked stops sending on the direct path for a while (doubling each
// time it fails again before ICE says it is connected anew).
func (p *Path) markBadLocked(now time.Time) {
	p.badUntil = now.Add(p.retry)
	p.retry = min(2*p.retry, directRetryMax)
	p.pending, p.pendingN = time.Time{}, 0
}

func (p *Path) deliver(pk []byte) {
	select {
	case p.in <- pk:
	default:
		pool.Put(&pk)
		p.dropped.Add(1)
	}
}

// sendQueue holds the packets for the direct path back to back in one
// buffer, with their sizes: quic-go's send loop appends each packet (one copy,
// no hand-over per packet), and writeUDP takes the whole buffer at once, in
// exchange for an empty one, and sends runs of one size with segmentation
// offload straight from it. A full queue makes the sender wait, as a full
// socket buffer would.
type sendQueue struct {
	mu     sync.Mutex
	cond   sync.Cond // the queue was taken, or closed
	buf    []byte
	sizes  []uint16
	closed bool
	kick   chan struct{} // something was queued
}

// sendQueueBytes bounds the packets a sendQueue holds.
const sendQueueBytes = 256 << 10

func (q *sendQueue) init() {
	q.cond.L = &q.mu
	q.buf = make([]byte, 0, sendQueueBytes)
	q.kick = make(chan struct{}, 1)
}

// add queues a copy of pk; false once the queue is closed.
func (q *sendQueue) add(pk []byte) bool {
	q.mu.Lock()
	for len(q.buf)+len(pk) > sendQueueBytes && !q.closed {
		q.cond.Wait()
	}
	if q.closed {
		q.mu.Unlock()
		return false
	}
	q.buf = append(q.buf, pk...)
	q.sizes = append(q.sizes, uint16(len(pk)))
	q.mu.Unlock()
	select {
	case q.kick <- struct{}{}:
	default:
	}
	return true
}

// take swaps the queued packets for buf and sizes (emptied).
func (q *sendQueue) take(buf []byte, sizes []uint16) ([]byte, []uint16) {
	q.mu.Lock()
	out, outSizes := q.buf, q.sizes
	q.buf, q.sizes = buf[:0], sizes[:0]
	q.cond.Broadcast()
	q.mu.Unlock()
	return out, outSizes
}

// close wakes the senders that wait; what is queued still goes (writeUDP).
func (q *sendQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// writeUDP sends the direct path's packets: a run of packets of one size (the
// last may be shorter) goes as one send with segmentation offload when the
// kernel takes it, up to maxSegments or maxGSOBytes.
func (p *Path) writeUDP(udp *net.UDPConn, gso bool) {
	defer close(p.wrote)
	defer p.sq.close() // no sender waits on a queue nobody takes
	const maxSegments = 64
	const maxGSOBytes = 65000 // below a UDP datagram's largest payload
	spare, spareSizes := make([]byte, 0, sendQueueBytes), []uint16(nil)
	oob := make([]byte, 0, 64)
	send := func(out []byte, sizes []uint16) bool {
		p.mu.Lock()
		to := p.remote
		p.mu.Unlock()
		off, single := 0, 0 // packets before single go one by one
		for i := 0; i < len(sizes); {
			size := int(sizes[i])
			j, total := i+1, size
			if gso && i >= single {
				for j < len(sizes) && j-i < maxSegments && int(sizes[j]) <= size && total+int(sizes[j]) <= maxGSOBytes {
					total += int(sizes[j])
					j++
					if int(sizes[j-1]) < size {
						break // a shorter packet ends a run
					}
				}
			}
			var err error
			if j-i == 1 {
				_, err = udp.WriteToUDPAddrPort(out[off:off+total], to)
			} else {
				oob = segmentControl(oob, size)
				_, _, err = udp.WriteMsgUDPAddrPort(out[off:off+total], oob, to)
			}
			switch {
			case err == nil:
			case errors.Is(err, net.ErrClosed):
				return false
			case j-i > 1:
				// The kernel refused the run as a whole: EIO says the device
				// takes no segmentation offload (one by one from now on); any
				// other error (EINVAL for segments above the route's MTU, an
				// unreachable network while the device moves) is met packet
				// by packet.
				if errors.Is(err, syscall.EIO) {
					gso = false
				}
				single = j
				continue
			case errors.Is(err, syscall.EMSGSIZE) && size > smallFor(to):
				// The route to the other end learnt a smaller MTU (an ICMP
				// "fragmentation needed"): this packet is lost, QUIC sends it
				// again, on the relay until a probe comes through.
				p.tooLarge()
			}
			off += total
			i = j
		}
		return true
	}
	for {
		select {
		case <-p.sq.kick:
		case <-p.closed:
			// What quic-go queued before the Path closed (its CONNECTION_CLOSE)
			// still goes out.
			out, sizes := p.sq.take(spare, spareSizes)
			send(out, sizes)
			return
		}
		out, sizes := p.sq.take(spare, spareSizes)
		if !send(out, sizes) {
			return
		}
		spare, spareSizes = out, sizes
	}
}

// readUDP reads the socket: a coalesced read (GRO) holds several packets of
// one size, and goes to QUIC as it is (one hand-over, no copy per packet) when
// all of them are QUIC packets; STUN messages go to ICE, probes are answered.
func (p *Path) readUDP(udp *net.UDPConn, stun func([]byte, netip.AddrPort), gro bool) {
	var oob []byte
	if gro {
		oob = make([]byte, 64)
	}
	r := rxPool.Get().(*rxRead)
	for {
		buf := r.buf
		if !gro {
			buf = buf[:MaxPacket]
		}
		n, oobn, _, from, err := udp.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			rxPool.Put(r)
			return // closed: the relay carries on
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) // an IPv4 peer on a dual-stack socket
		seg := n
		if s := coalescedSize(oob[:oobn]); s > 0 {
			seg = s
		}
		quic := 0 // QUIC packets in the read
		for off := 0; off < n; off += seg {
			pk := buf[off:min(off+seg, n)]
			switch {
			case isSTUN(pk):
				stun(pk, from)
			case isProbe(pk):
				p.onProbe(udp, pk, from)
			case isQUIC(pk):
				quic++
			}
		}
		if quic == 0 {
			continue
		}
		p.mu.Lock()
		if from == p.remote {
			p.pending, p.pendingN = time.Time{}, 0
			if !time.Now().Before(p.badUntil) {
				p.retry = directRetry // the path works: a later failure starts the back-off anew
			}
		}
		p.mu.Unlock()
		p.directIn.Add(int64(quic))
		if quic > 1 && quic*seg >= n && seg <= MaxPacket {
			// QUIC packets only: the read goes over as it is.
			r.n, r.seg, r.off = n, seg, 0
			select {
			case p.inr <- r:
				r = rxPool.Get().(*rxRead)
			default:
				p.dropped.Add(int64(quic))
			}
			continue
		}
		for off := 0; off < n; off += seg {
			if pk := buf[off:min(off+seg, n)]; isQUIC(pk) {
				bp := pool.Get().(*[]byte)
				p.deliver(append((*bp)[:0], pk...))
			}
		}
	}
}

// What a datagram on the direct path is (RFC 7983's first-byte ranges, and
// TP's probes in a range QUIC does not use).
func isSTUN(pk []byte) bool { return len(pk) > 0 && pk[0]&0xc0 == 0 }

func isProbe(pk []byte) bool {
	return len(pk) >= probeLen && pk[0] == probeMarker && [4]byte(pk[1:5]) == probeMagic
}

func isQUIC(pk []byte) bool {
	return len(pk) > 0 && len(pk) <= MaxPacket && !isSTUN(pk) && !isProbe(pk)
}

// probeMTU checks that the direct path carries packets of MaxPacket bytes.
// Each time it comes up, or moves, without that shown: a probe every
// probeFast, probeTries in a row, then every probeSlow. Once shown, a probe
// every probeSlow; probeMisses in a row unanswered take it back (a route whose
// MTU shrank), as does the kernel refusing a large packet (tooLarge).
func (p *Path) probeMTU(udp *net.UDPConn) {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	buf := make([]byte, MaxPacket)
	buf[0] = probeMarker
	copy(buf[1:5], probeMagic[:])
	buf[5] = probeKind
	tries := 0
	for {
		select {
		case <-p.closed:
			return
		case <-p.probeKick:
			tries = 0
		case <-t.C:
		}
		now := time.Now()
		p.mu.Lock()
		if !p.useDirectLocked(now) {
			p.probeOut = 0 // the next time it comes up, a kick
			p.mu.Unlock()
			continue
		}
		if wait := p.probeSent.Add(probeFirst).Sub(now); p.probeOut != 0 && wait > 0 {
			// A kick right after a probe (the path came up as it moved):
			// that probe's answer may still come.
			p.mu.Unlock()
			t.Reset(wait)
			continue
		}
		if p.probeOut != 0 {
			p.probeMiss++
			if p.large && p.probeMiss >= probeMisses {
				p.large, p.recent, tries = false, [4]uint64{}, 0
			}
		}
		nonce := rand.Uint64() | 1
		p.probeOut, p.probeSent = nonce, now
		copy(p.recent[1:], p.recent[:])
		p.recent[0] = nonce
		to, large, miss := p.remote, p.large, p.probeMiss
		p.mu.Unlock()
		binary.BigEndian.PutUint64(buf[6:probeLen], nonce)
		_, _ = udp.WriteToUDPAddrPort(buf, to) // EMSGSIZE: this host's own route is smaller; a miss
		switch {
		case !large && tries < probeTries:
			t.Reset(min(probeFirst<<tries, probeFast))
		case large && miss > 0:
			t.Reset(probeFast)
		default:
			t.Reset(probeSlow)
		}
		tries++
	}
}

// onProbe answers the other end's probe, or takes the answer to this end's.
// Only the other end's address on the direct path is heard.
func (p *Path) onProbe(udp *net.UDPConn, pk []byte, from netip.AddrPort) {
	nonce := binary.BigEndian.Uint64(pk[6:probeLen])
	if nonce == 0 {
		return
	}
	p.mu.Lock()
	switch {
	case pk[5] == probeKind && from == p.remote:
		p.mu.Unlock()
		answerProbe(udp, pk, from)
		return
	case pk[5] == probeKind:
		copy(p.heard[:], pk[:probeLen])
		p.heardFrom = from
	case pk[5] == answerKind && from == p.remote && slices.Contains(p.recent[:], nonce):
		// An answer to an earlier probe counts too: a round trip longer
		// than the probes' interval still shows the path.
		p.large, p.probeOut, p.probeMiss = true, 0, 0
	}
	p.mu.Unlock()
}

// answerProbe answers a probe: its first probeLen bytes, of the answer's kind.
func answerProbe(udp *net.UDPConn, probe []byte, to netip.AddrPort) {
	var a [probeLen]byte
	copy(a[:], probe[:probeLen])
	a[5] = answerKind
	_, _ = udp.WriteToUDPAddrPort(a[:], to)
}

// tooLarge: the kernel refused a packet above smallFor for the direct
// path; large packets go on the relay until a probe comes through again.
func (p *Path) tooLarge() {
	p.mu.Lock()
	if p.large {
		p.large, p.probeOut, p.probeMiss, p.recent = false, 0, 0, [4]uint64{}
		p.kickProbe()
	}
	p.mu.Unlock()
}

func (p *Path) readRelay(expect []byte) {
	if len(expect) > 0 {
		got := make([]byte, len(expect))
		if _, err := io.ReadFull(p.br, got); err != nil || string(got) != string(expect) {
			// An agent that refuses, an older one whose TLS server failed on
			// the marker, a stream cut before the answer: the dialer goes on
			// without a pair.
			p.fail(ErrRefused)
			return
		}
	}
	var hdr [3]byte
	for {
		if _, err := io.ReadFull(p.br, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				err = ErrRelayEnded
			}
			p.fail(err)
			return
		}
		p.lastHeard.Store(time.Now().UnixNano())
		n := int(binary.BigEndian.Uint16(hdr[1:]))
		switch {
		case hdr[0] == framePing && n == 0:
			continue
		case hdr[0] == framePing:
			p.fail(fmt.Errorf("tp direct: a ping frame with %d bytes; pings are empty", n))
			return
		case hdr[0] != framePacket:
			p.fail(fmt.Errorf("tp direct: a relay frame of type 0x%02x", hdr[0]))
			return
		case n == 0 || n > MaxPacket:
			p.fail(fmt.Errorf("tp direct: a relayed packet of %d bytes; 1 to %d", n, MaxPacket))
			return
		}
		bp := pool.Get().(*[]byte)
		pk := (*bp)[:n]
		if _, err := io.ReadFull(p.br, pk); err != nil {
			pool.Put(bp)
			p.fail(fmt.Errorf("tp direct: the relay stream ended in a packet: %w", err))
			return
		}
		p.relayIn.Add(1)
		p.deliver(pk)
	}
}

// writeRelay writes queued packets, several to a write, and a ping every
// PingEvery; it also ends the Path when the relay went silent.
func (p *Path) writeRelay() {
	tick := time.NewTicker(PingEvery)
	defer tick.Stop()
	buf := make([]byte, 0, 64<<10)
	frame := func(t byte, b []byte) {
		buf = append(buf, t, byte(len(b)>>8), byte(len(b)))
		buf = append(buf, b...)
	}
	check := time.NewTicker(time.Second)
	defer check.Stop()
	for {
		buf = buf[:0]
		select {
		case <-p.done:
			return
		case <-p.finish:
			for len(buf) < cap(buf)-MaxPacket-3 {
				select {
				case pk := <-p.out:
					frame(framePacket, pk)
					pool.Put(&pk)
					continue
				default:
				}
				break
			}
			_ = p.relay.SetWriteDeadline(time.Now().Add(time.Second))
			if _, err := p.relay.Write(buf); err == nil {
				if cw, ok := p.relay.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
			}
			close(p.finished)
			return
		case <-check.C:
			if time.Since(time.Unix(0, p.lastHeard.Load())) > Silence {
				p.fail(ErrSilent)
				return
			}
			continue
		case <-tick.C:
			frame(framePing, nil)
		case pk := <-p.out:
			frame(framePacket, pk)
			pool.Put(&pk)
		more:
			for len(buf) < cap(buf)-MaxPacket-3 {
				select {
				case pk := <-p.out:
					frame(framePacket, pk)
					pool.Put(&pk)
				default:
					break more
				}
			}
		}
		_ = p.relay.SetWriteDeadline(time.Now().Add(Silence))
		if _, err := p.relay.Write(buf); err != nil {
			p.fail(fmt.Errorf("tp direct: writing to the relay stream: %w", err))
			return
		}
	}
}

func (p *Path) LocalAddr() net.Addr { return addr("this-device") }

// RemoteAddr is the one address quic-go sees the peer at.
func (p *Path) RemoteAddr() net.Addr { return peerAddr }

func (p *Path) SetDeadline(t time.Time) error { return p.SetReadDeadline(t) }

func (p *Path) SetReadDeadline(t time.Time) error {
	p.rdMu.Lock()
	defer p.rdMu.Unlock()
	if p.rdTimer != nil {
		p.rdTimer.Stop()
		p.rdTimer = nil
	}
	if p.rdFired { // a reader waits on the current channel only until it fires
		p.rdCh, p.rdFired = make(chan struct{}), false
	}
	if t.IsZero() {
		return nil
	}
	p.rdGen++
	ch, gen := p.rdCh, p.rdGen
	fire := func() {
		p.rdMu.Lock()
		defer p.rdMu.Unlock()
		if p.rdCh == ch && p.rdGen == gen && !p.rdFired {
			close(ch)
			p.rdFired = true
		}
	}
	if d := time.Until(t); d <= 0 {
		close(ch)
		p.rdFired = true
	} else {
		p.rdTimer = time.AfterFunc(d, fire)
	}
	return nil
}

func (p *Path) SetWriteDeadline(time.Time) error { return nil }
