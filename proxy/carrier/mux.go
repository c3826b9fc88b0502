package carrier

import (
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/net/ipv4"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Options bounds the stream carriers. Zero values take the defaults.
type Options struct {
	// MaxSessions bounds the carrier sessions (TLS streams and WebSockets) open
	// at once over all clients; a further one is refused. Default 1024.
	MaxSessions int
	// Idle ends a carrier session that carried no packet for this long. QUIC's
	// keepalives (15 s) keep a live one busy. Default 2 minutes.
	Idle time.Duration
	// A ws or http carrier session is opened without a certificate: it is
	// unproven until a QUIC connection of a device (a completed handshake
	// with its certificate) runs over it. A tls carrier session is proven at
	// its own handshake. Unproven sessions are bounded so that nobody without
	// a certificate can take the slots of those who have one:
	//
	// MaxUnprovenPerSource bounds the unproven sessions of one source
	// address (IPv6: its /64); one more ends that source's oldest. Default 16.
	MaxUnprovenPerSource int
	// ProveWithin ends a session still unproven this long after it opened.
	// Default 30 s.
	ProveWithin time.Duration
	// MaxPerDevice bounds the proven sessions of one device; one more ends
	// that device's oldest. Default 16.
	MaxPerDevice int
}

const (
	defaultCarrierSessions = 1024
	defaultCarrierIdle     = 2 * time.Minute
	defaultUnprovenPerSrc  = 16
	defaultProveWithin     = 30 * time.Second
	defaultCarrierPerDev   = 16
	// carrierOutQueue bounds the packets waiting to be written to one carrier
	// session (server → client): beyond it packets are dropped, which QUIC's
	// congestion control reads as loss. 128 × 1500 octets = 192 KiB per session.
	carrierOutQueue = 128
	// carrierInQueue bounds the packets from all carriers waiting for quic-go
	// to read them (client → server), 1.5 MiB in all.
	carrierInQueue = 1024
)

func (o Options) withDefaults() Options {
	if o.MaxSessions <= 0 {
		o.MaxSessions = defaultCarrierSessions
	}
	if o.Idle <= 0 {
		o.Idle = defaultCarrierIdle
	}
	if o.MaxUnprovenPerSource <= 0 {
		o.MaxUnprovenPerSource = defaultUnprovenPerSrc
	}
	if o.ProveWithin <= 0 {
		o.ProveWithin = defaultProveWithin
	}
	if o.MaxPerDevice <= 0 {
		o.MaxPerDevice = defaultCarrierPerDev
	}
	return o
}

// sweepEvery is how often a carrier session checks its bounds (idle, proof).
func (o Options) sweepEvery() time.Duration {
	return min(o.Idle/4, o.ProveWithin/3, 15*time.Second)
}

// carrierPrefix is the network of the carriers' virtual addresses: 100::/64, the
// IPv6 discard-only prefix (RFC 6666), which no real packet comes from. The low
// 64 bits are random per session; the port names the carrier.
var carrierPrefix = [8]byte{0x01, 0x00}

// IsVirtual reports whether a is a carrier session's virtual address (the
// source the QUIC transport sees for packets that came over a stream
// carrier), not an address on the network.
func IsVirtual(a netip.Addr) bool {
	b := a.As16()
	return a.Is6() && [8]byte(b[:8]) == carrierPrefix
}

func isCarrierIP(ip net.IP) bool {
	return len(ip) == net.IPv6len && [8]byte(ip[:8]) == carrierPrefix
}

var carrierPorts = map[string]int{wire.CarrierTLS: 1, wire.CarrierWS: 2, wire.CarrierHTTP: 3}

var carrierBufs = sync.Pool{New: func() any { b := make([]byte, wire.MaxCarrierPacket); return &b }}

func getCarrierBuf() *[]byte  { return carrierBufs.Get().(*[]byte) }
func putCarrierBuf(b *[]byte) { *b = (*b)[:cap(*b)]; carrierBufs.Put(b) }

type carrierPacket struct {
	buf  *[]byte
	n    int
	from *net.UDPAddr
}

// session is one client's carrier link as the mux sees it.
type session struct {
	addr   *net.UDPAddr
	kind   string
	remote string       // the real peer (TCP address), for logs
	src    netip.Prefix // the real peer's address (IPv6: its /64), for MaxUnprovenPerSource
	opened time.Time
	device string        // the device whose QUIC connection runs over it; "" while unproven (mu)
	ended  atomic.Value  // int: why the mux ended it (a carrierEnded* reason), once it chose to
	out    chan *[]byte  // server → client, bounded (carrierOutQueue)
	done   chan struct{} // closed when the session ends
	last   atomic.Int64  // unix nanoseconds of the last packet either way
	in, o  atomic.Int64  // packets each way
	drops  atomic.Int64  // packets to the client dropped with out full
	closed sync.Once
}

func (cs *session) touch() { cs.last.Store(time.Now().UnixNano()) }

// Mux is the PacketConn under the server's QUIC transport; it satisfies
// quic.OOBCapablePacketConn and ReadBatch, so that quic-go keeps its fast path
// on the UDP socket (batched reads, GSO, ECN).
type Mux struct {
	udp   *net.UDPConn
	batch BatchReader // the socket's datagrams
	opts  Options
	log   *slog.Logger

	mu       sync.Mutex
	queue    []carrierPacket // client → server packets from carriers (carrierInQueue)
	reading  bool            // ReadBatch is waiting on the socket
	poked    bool            // and its wait was interrupted
	deadline time.Time       // the read deadline quic-go set
	closed   bool
	sessions map[netip.Addr]*session
	conns    map[*quic.Conn]string // the server's QUIC connections of devices, by device (addConn)

	inDrops atomic.Int64 // carrier packets dropped with the queue full
	ended   [nCarrierEnded]atomic.Int64

	nonQUIC func(b []byte, from *net.UDPAddr) []byte // SetNonQUIC
}

// SetNonQUIC makes the mux hand f each datagram from the socket that is no
// QUIC packet (its first two bits are zero, as STUN's are: RFC 7983) and
// send back what f returns, from the address the datagram reached (the
// socket's packet info: a wildcard socket on a host of several addresses
// answers from the right one). quic-go does not see such datagrams. Call it
// before the QUIC transport reads.
func (m *Mux) SetNonQUIC(f func(b []byte, from *net.UDPAddr) []byte) { m.nonQUIC = f }

// Why the mux ends a carrier session itself (Stats.Ended).
const (
	carrierEndedSourceCap = iota // the source opened one unproven session too many
	carrierEndedFull             // the table was full: the oldest unproven session made room
	carrierEndedUnproven         // no device's QUIC connection ran over it within ProveWithin
	carrierEndedDeviceCap        // its device opened one proven session too many
	nCarrierEnded
)

// EndReasons name the reasons of Stats.Ended, in order.
var EndReasons = [nCarrierEnded]string{"source_cap", "full", "unproven", "device_cap"}

var carrierEndSentences = [nCarrierEnded]string{
	"its source opened more unproven carrier sessions than it may",
	"the carrier sessions were full and it was the oldest unproven one",
	"no QUIC connection of a device ran over it in time",
	"its device opened more carrier sessions than it may",
}

// BatchReader reads a UDP socket's datagrams in batches, as
// ipv4.PacketConn.ReadBatch does (each message one datagram).
type BatchReader interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
}

// NewMux returns the mux over udp, which it owns from now on (Close closes
// it); it reads udp's datagrams through batch (nil: ipv4.NewPacketConn(udp);
// the server passes a reader of coalesced bursts). The QUIC transport reads
// and writes through the mux.
func NewMux(udp *net.UDPConn, batch BatchReader, opts Options, log *slog.Logger) *Mux {
	if batch == nil {
		batch = ipv4.NewPacketConn(udp)
	}
	return &Mux{
		udp:      udp,
		batch:    batch,
		opts:     opts.withDefaults(),
		log:      log,
		sessions: make(map[netip.Addr]*session),
		conns:    make(map[*quic.Conn]string),
	}
}

// sourceOf is the address a session's bounds are counted by: the peer's IP,
// and for IPv6 its /64 (one host's share of addresses).
func sourceOf(remote string) netip.Prefix {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return netip.Prefix{}
	}
	return SourcePrefix(ap.Addr())
}

// SourcePrefix is what bounds per source count a's traffic by: an IPv4
// address, or an IPv6 address's /64 (one host's share of addresses).
func SourcePrefix(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.Prefix(64)
	return p
}

// AddConn records a QUIC connection of device: a carrier session it runs over,
// now or after it moves there, is proven (prove).
func (m *Mux) AddConn(conn *quic.Conn, device string) {
	m.mu.Lock()
	m.conns[conn] = device
	victims := m.proveLocked()
	m.mu.Unlock()
	m.endAll(victims)
}

// RemoveConn forgets a QUIC connection AddConn recorded, as it ends.
func (m *Mux) RemoveConn(conn *quic.Conn) {
	m.mu.Lock()
	delete(m.conns, conn)
	m.mu.Unlock()
}

// proveLocked marks the sessions that a device's QUIC connection runs over
// now as that device's, and returns those to end because a device holds too
// many (MaxPerDevice, oldest first). A connection's address is its current
// path, so a connection that moved onto a carrier proves it too.
func (m *Mux) proveLocked() (victims []*session) {
	for conn, device := range m.conns {
		ua, ok := conn.RemoteAddr().(*net.UDPAddr)
		if !ok || !isCarrierIP(ua.IP) {
			continue
		}
		if cs := m.sessions[netip.AddrFrom16([16]byte(ua.IP))]; cs != nil && cs.device == "" {
			cs.device = device
			victims = append(victims, m.overDeviceLocked(device)...)
		}
	}
	return victims
}

// overDeviceLocked returns device's oldest sessions beyond MaxPerDevice.
func (m *Mux) overDeviceLocked(device string) []*session {
	var mine []*session
	for _, cs := range m.sessions {
		if cs.device == device && cs.ended.Load() == nil {
			mine = append(mine, cs)
		}
	}
	if len(mine) <= m.opts.MaxPerDevice {
		return nil
	}
	slices.SortFunc(mine, func(a, b *session) int { return a.opened.Compare(b.opened) })
	out := mine[:len(mine)-m.opts.MaxPerDevice]
	for _, cs := range out {
		cs.ended.Store(carrierEndedDeviceCap)
	}
	return out
}

// oldestUnprovenLocked is the oldest unproven session not already ending,
// of source src when src is valid; nil if there is none.
func (m *Mux) oldestUnprovenLocked(src netip.Prefix, count *int) *session {
	var oldest *session
	for _, cs := range m.sessions {
		if cs.device != "" || cs.ended.Load() != nil || src.IsValid() && cs.src != src {
			continue
		}
		if count != nil {
			*count++
		}
		if oldest == nil || cs.opened.Before(oldest.opened) {
			oldest = cs
		}
	}
	return oldest
}

// endAll ends the sessions the bounds chose, each with its reason.
func (m *Mux) endAll(victims []*session) {
	for _, cs := range victims {
		if r, ok := cs.ended.Load().(int); ok {
			m.ended[r].Add(1)
			m.log.Info("carrier session ended", "carrier", cs.kind, "remote", cs.remote, "addr", cs.addr.String(), "why", carrierEndSentences[r])
		}
		m.end(cs)
	}
}

// overdue reports why cs is to end now by the mux's bounds: idle too long,
// or still unproven at ProveWithin; "" if it may go on.
func (m *Mux) overdue(cs *session) string {
	if time.Since(time.Unix(0, cs.last.Load())) > m.opts.Idle {
		return "carrier idle"
	}
	if time.Since(cs.opened) < m.opts.ProveWithin {
		return ""
	}
	m.mu.Lock()
	victims := m.proveLocked()
	unproven := cs.device == ""
	if unproven {
		cs.ended.CompareAndSwap(nil, carrierEndedUnproven)
	}
	m.mu.Unlock()
	m.endAll(victims)
	if unproven {
		m.ended[carrierEndedUnproven].Add(1)
		return carrierEndSentences[carrierEndedUnproven]
	}
	return ""
}

var errCarrierBusy = errors.New("too many carrier sessions")

// open starts a carrier session for a client whose real address is remote;
// device is the device a tls carrier's handshake proved, "" for ws and http
// (unproven until a device's QUIC connection runs over it). Bounds: an
// unproven session beyond its source's MaxUnprovenPerSource ends that
// source's oldest; with MaxSessions open, the oldest unproven session makes
// room, and only when every session is proven is the new one refused.
func (m *Mux) open(kind, remote, device string) (*session, error) {
	var id [16]byte
	copy(id[:8], carrierPrefix[:])
	_, _ = rand.Read(id[8:])
	cs := &session{
		addr:   &net.UDPAddr{IP: net.IP(id[:]), Port: carrierPorts[kind]},
		kind:   kind,
		remote: remote,
		src:    sourceOf(remote),
		opened: time.Now(),
		device: device,
		out:    make(chan *[]byte, carrierOutQueue),
		done:   make(chan struct{}),
	}
	cs.touch()
	var victims []*session
	defer func() { m.endAll(victims) }()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, net.ErrClosed
	}
	if device == "" && cs.src.IsValid() {
		n := 0
		if oldest := m.oldestUnprovenLocked(cs.src, &n); n >= m.opts.MaxUnprovenPerSource {
			oldest.ended.Store(carrierEndedSourceCap)
			victims = append(victims, oldest)
		}
	}
	if m.live() >= m.opts.MaxSessions {
		victims = append(victims, m.proveLocked()...)
		if m.live() >= m.opts.MaxSessions {
			oldest := m.oldestUnprovenLocked(netip.Prefix{}, nil)
			if oldest == nil {
				return nil, errCarrierBusy
			}
			oldest.ended.Store(carrierEndedFull)
			victims = append(victims, oldest)
		}
	}
	m.sessions[netip.AddrFrom16(id)] = cs
	if device != "" {
		victims = append(victims, m.overDeviceLocked(device)...)
	}
	return cs, nil
}

// live counts the sessions not already chosen to end (mu held).
func (m *Mux) live() int {
	n := 0
	for _, cs := range m.sessions {
		if cs.ended.Load() == nil {
			n++
		}
	}
	return n
}

// end removes cs; packets for its address are dropped from now on.
func (m *Mux) end(cs *session) {
	cs.closed.Do(func() {
		m.mu.Lock()
		delete(m.sessions, netip.AddrFrom16([16]byte(cs.addr.IP)))
		m.mu.Unlock()
		close(cs.done)
		for {
			select {
			case b := <-cs.out:
				putCarrierBuf(b)
			default:
				return
			}
		}
	})
}

// deliver queues a packet that cs received for quic-go; it takes buf.
func (m *Mux) deliver(cs *session, buf *[]byte, n int) {
	cs.touch()
	cs.in.Add(1)
	m.mu.Lock()
	if m.closed || len(m.queue) >= carrierInQueue {
		m.mu.Unlock()
		m.inDrops.Add(1)
		putCarrierBuf(buf)
		return
	}
	m.queue = append(m.queue, carrierPacket{buf: buf, n: n, from: cs.addr})
	if m.reading && !m.poked {
		m.poked = true
		_ = m.udp.SetReadDeadline(time.Unix(1, 0))
	}
	m.mu.Unlock()
}

// ReadBatch gives quic-go the queued carrier packets, or else a batch from the
// UDP socket. Datagrams that claim a carrier address are dropped.
func (m *Mux) ReadBatch(ms []ipv4.Message, flags int) (int, error) {
	for {
		m.mu.Lock()
		if len(m.queue) > 0 {
			n := 0
			for n < len(ms) && n < len(m.queue) {
				p := m.queue[n]
				ms[n].N = copy(ms[n].Buffers[0], (*p.buf)[:p.n])
				ms[n].NN, ms[n].Flags, ms[n].Addr = 0, 0, p.from
				putCarrierBuf(p.buf)
				n++
			}
			rest := copy(m.queue, m.queue[n:])
			clear(m.queue[rest:])
			m.queue = m.queue[:rest]
			m.mu.Unlock()
			return n, nil
		}
		if m.closed {
			m.mu.Unlock()
			return 0, net.ErrClosed
		}
		if !m.deadline.IsZero() && !time.Now().Before(m.deadline) {
			m.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		}
		m.reading = true
		m.mu.Unlock()

		n, err := m.batch.ReadBatch(ms, flags)

		m.mu.Lock()
		m.reading = false
		if m.poked {
			m.poked = false
			_ = m.udp.SetReadDeadline(m.deadline)
			if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
				m.mu.Unlock()
				continue // interrupted for a carrier packet, or quic-go's own deadline: the loop looks
			}
		}
		m.mu.Unlock()
		if err != nil {
			return n, err
		}
		// A datagram whose source claims a carrier address (spoofed) is
		// emptied: quic-go ignores an empty packet. (Messages stay in place:
		// quic-go pairs each with its own buffer.)
		for i := range n {
			if a, ok := ms[i].Addr.(*net.UDPAddr); ok && isCarrierIP(a.IP) {
				ms[i].N = 0
			}
		}
		if m.nonQUIC != nil {
			for i := range n {
				b := ms[i].Buffers[0][:ms[i].N]
				if len(b) == 0 || b[0]&0xc0 != 0 {
					continue
				}
				if a, ok := ms[i].Addr.(*net.UDPAddr); ok {
					if resp := m.nonQUIC(b, a); resp != nil {
						_, _, _ = m.udp.WriteMsgUDP(resp, replyPacketInfo(ms[i].OOB[:ms[i].NN]), a)
					}
				}
				ms[i].N = 0
			}
		}
		return n, nil
	}
}

// WriteMsgUDP sends a packet (or a GSO batch of packets) to addr: the socket for
// a real address, the carrier session for a virtual one.
func (m *Mux) WriteMsgUDP(b, oob []byte, addr *net.UDPAddr) (int, int, error) {
	if addr != nil && isCarrierIP(addr.IP) {
		m.toCarrier(b, gsoSize(oob), addr)
		return len(b), len(oob), nil
	}
	return m.udp.WriteMsgUDP(b, oob, addr)
}

func (m *Mux) WriteTo(b []byte, addr net.Addr) (int, error) {
	if a, ok := addr.(*net.UDPAddr); ok && isCarrierIP(a.IP) {
		m.toCarrier(b, 0, a)
		return len(b), nil
	}
	return m.udp.WriteTo(b, addr)
}

// toCarrier splits b into packets of seg octets (all of b when seg is 0) and
// queues them on the session of addr; without one, or with its queue full,
// they are dropped (QUIC reads that as loss).
func (m *Mux) toCarrier(b []byte, seg int, addr *net.UDPAddr) {
	m.mu.Lock()
	cs := m.sessions[netip.AddrFrom16([16]byte(addr.IP))]
	m.mu.Unlock()
	if cs == nil {
		return
	}
	if seg <= 0 {
		seg = len(b)
	}
	for len(b) > 0 {
		n := min(seg, len(b))
		p := b[:n]
		b = b[n:]
		if len(p) > wire.MaxCarrierPacket {
			cs.drops.Add(1)
			continue
		}
		buf := getCarrierBuf()
		*buf = (*buf)[:copy(*buf, p)]
		select {
		case cs.out <- buf:
			cs.o.Add(1)
		default:
			putCarrierBuf(buf)
			cs.drops.Add(1)
		}
	}
}

// ReadMsgUDP reads one packet (quic-go uses ReadBatch; this completes the interface).
func (m *Mux) ReadMsgUDP(b, oob []byte) (n, oobn, flags int, addr *net.UDPAddr, err error) {
	ms := []ipv4.Message{{Buffers: [][]byte{b}, OOB: oob}}
	if _, err := m.ReadBatch(ms, 0); err != nil {
		return 0, 0, 0, nil, err
	}
	a, _ := ms[0].Addr.(*net.UDPAddr)
	return ms[0].N, ms[0].NN, ms[0].Flags, a, nil
}

func (m *Mux) ReadFrom(b []byte) (int, net.Addr, error) {
	n, _, _, a, err := m.ReadMsgUDP(b, nil)
	return n, a, err
}

func (m *Mux) SetReadDeadline(t time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.deadline = t
	if m.reading && m.poked {
		return nil // ReadBatch restores it once it returns
	}
	if m.reading && !t.IsZero() && !time.Now().Before(t) {
		m.poked = true
	}
	return m.udp.SetReadDeadline(t)
}

func (m *Mux) SetDeadline(t time.Time) error {
	_ = m.udp.SetWriteDeadline(t)
	return m.SetReadDeadline(t)
}

func (m *Mux) SetWriteDeadline(t time.Time) error { return m.udp.SetWriteDeadline(t) }
func (m *Mux) LocalAddr() net.Addr                { return m.udp.LocalAddr() }
func (m *Mux) SyscallConn() (syscall.RawConn, error) {
	return m.udp.SyscallConn()
}
func (m *Mux) SetReadBuffer(n int) error  { return m.udp.SetReadBuffer(n) }
func (m *Mux) SetWriteBuffer(n int) error { return m.udp.SetWriteBuffer(n) }

// Close ends every carrier session and closes the socket.
func (m *Mux) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	sessions := make([]*session, 0, len(m.sessions))
	for _, cs := range m.sessions {
		sessions = append(sessions, cs)
	}
	for _, p := range m.queue {
		putCarrierBuf(p.buf)
	}
	m.queue = nil
	m.mu.Unlock()
	for _, cs := range sessions {
		m.end(cs)
	}
	return m.udp.Close()
}

// carrierLink is one client's carrier connection as a packet pipe.
type carrierLink interface {
	readPacket(ctx context.Context, b []byte) (int, error)
	writePacket(ctx context.Context, b []byte) error
	flush() error // sends what writePacket buffered
	close()
}

// serveCarrier moves packets between link and the mux until either side ends,
// the link idles for opts.Idle, or ctx ends.
func (m *Mux) serveCarrier(ctx context.Context, kind, remote, device string, link carrierLink) error {
	cs, err := m.open(kind, remote, device)
	if err != nil {
		return err
	}
	start := time.Now()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // server → client
		defer wg.Done()
		for {
			select {
			case b := <-cs.out:
				err := link.writePacket(ctx, *b)
				putCarrierBuf(b)
				if err == nil && len(cs.out) == 0 {
					err = link.flush()
				}
				if err != nil {
					cancel(err)
					return
				}
				cs.touch()
			case <-cs.done:
				cancel(nil)
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	go func() { // the idle bound
		defer wg.Done()
		t := time.NewTicker(m.opts.sweepEvery())
		defer t.Stop()
		for {
			select {
			case <-t.C:
				if why := m.overdue(cs); why != "" {
					cancel(errors.New(why))
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	stop := context.AfterFunc(ctx, link.close)
	defer stop()
	var rerr error
	for {
		buf := getCarrierBuf()
		n, err := link.readPacket(ctx, *buf)
		if err != nil {
			putCarrierBuf(buf)
			rerr = err
			break
		}
		m.deliver(cs, buf, n)
	}
	if r, ok := cs.ended.Load().(int); ok && rerr != nil {
		rerr = errors.New(carrierEndSentences[r]) // the mux ended it (its bounds)
	}
	cancel(rerr)
	link.close()
	m.end(cs)
	wg.Wait()
	m.log.Info("carrier session", "carrier", kind, "remote", remote, "addr", cs.addr.String(),
		"packets_in", cs.in.Load(), "packets_out", cs.o.Load(), "dropped_out", cs.drops.Load(),
		"duration", time.Since(start), "end", carrierEnd(context.Cause(ctx)))
	return nil
}

func carrierEnd(err error) string {
	switch {
	case err == nil:
		return "closed"
	case errors.Is(err, net.ErrClosed), errors.Is(err, context.Canceled):
		return "closed"
	default:
		return err.Error()
	}
}

// Remote maps a carrier session's virtual address to the address its
// carrier connection came from (the TCP peer: for ws and http behind a CDN or
// reverse proxy, that proxy's address). A nil Mux (QUIC not served) knows
// none.
func (m *Mux) Remote(a net.Addr) (string, bool) {
	ua, ok := a.(*net.UDPAddr)
	if !ok || !isCarrierIP(ua.IP) {
		return "", false
	}
	if m == nil {
		return "", false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	cs := m.sessions[netip.AddrFrom16([16]byte(ua.IP))]
	if cs == nil {
		return "", false
	}
	return cs.remote, true
}

// Stats are the carrier sessions (docs/PROTOCOL.md, "Carriers").
type Stats struct {
	// Open counts the sessions open now by carrier (tls, ws, http) and by
	// whether a device's QUIC connection has proven them ("proven",
	// "unproven").
	Open map[string]map[string]int
	// Ended counts the sessions the server ended by its bounds, by reason
	// (EndReasons).
	Ended map[string]int64
}

// Stats reports the carrier sessions; zero for a nil Mux (QUIC not served).
func (m *Mux) Stats() Stats {
	st := Stats{Open: map[string]map[string]int{}, Ended: map[string]int64{}}
	for kind := range carrierPorts {
		st.Open[kind] = map[string]int{"proven": 0, "unproven": 0}
	}
	if m == nil {
		for _, r := range EndReasons {
			st.Ended[r] = 0
		}
		return st
	}
	m.mu.Lock()
	for _, cs := range m.sessions {
		state := "unproven"
		if cs.device != "" {
			state = "proven"
		}
		st.Open[cs.kind][state]++
	}
	m.mu.Unlock()
	for i, r := range EndReasons {
		st.Ended[r] = m.ended[i].Load()
	}
	return st
}

// Sessions reports the carrier sessions open now; 0 for a nil Mux.
func (m *Mux) Sessions() int {
	if m == nil {
		return 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.sessions)
}
