package transport

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/net/ipv4"

	"github.com/tp-proxy/tp/internal/lib/udpgro"
	"github.com/tp-proxy/tp/proxy/wire"
)

// MovingConn is the packet conn of a QUIC connection that may move between
// carriers (a Dialer with FallbackCarriers): UDP until MoveTo, then the
// carrier's conn. quic-go sees one socket whose packets now leave from
// elsewhere; the server sees the client at a new address (the
// carrier session's) and migrates, validating the new path, as after a NAT
// rebinding. (quic-go's own Conn.AddPath cannot do this: it sends path probes
// only while the congestion window lets it send, which a connection whose
// path died with data in flight never does again.)
//
// quic-go sees it as a UDP socket (quic.OOBCapablePacketConn with a
// ReadBatch) and keeps its fast path while the connection is on UDP: batched
// reads, coalesced where the kernel joins bursts (package udpgro), and GSO
// sends. On a carrier, a GSO send is cut into its packets and control
// messages are dropped (quic-go's ECN then finds the path unmarked and stays
// off). Its connections run without path MTU discovery (configFor).
type MovingConn struct {
	udp    *net.UDPConn
	rd     *udpgro.Reader
	server net.Addr // what reads from a carrier say they came from

	mu      sync.Mutex
	carrier *CarrierConn
	rdl     time.Time
	// recent are the last packets written (a ring of movingReplay), sent again
	// over the next carrier on a move: see MoveTo.
	recent [movingReplay][]byte
	next   int
	// udpFailing is when writes to the UDP socket began to fail, without a
	// success since (unix nanoseconds; 0: the last write went out).
	udpFailing atomic.Int64
}

// NewMovingConn returns a MovingConn on udp whose reads from a carrier say
// they came from server.
func NewMovingConn(udp *net.UDPConn, server net.Addr) *MovingConn {
	return &MovingConn{udp: udp, rd: udpgro.NewReader(udp), server: server}
}

// ServerAddr is what reads from a carrier say they came from.
func (m *MovingConn) ServerAddr() net.Addr { return m.server }

// UDPWritesFailing is how long every write to the UDP socket has failed.
func (m *MovingConn) UDPWritesFailing() time.Duration {
	if f := m.udpFailing.Load(); f != 0 && m.Current() == nil {
		return time.Since(time.Unix(0, f))
	}
	return 0
}

// movingReplay is how many of the last packets a move sends again.
const movingReplay = 4

// remember keeps a copy of the packets in b (one, or a GSO send's of seg
// bytes each) among the recent packets.
func (m *MovingConn) remember(b []byte, seg int) {
	if seg <= 0 {
		seg = len(b)
	}
	if k := len(b) / max(seg, 1); k > movingReplay { // only the last few are kept
		b = b[(k-movingReplay)*seg:]
	}
	m.mu.Lock()
	for off := 0; off < len(b); off += seg {
		p := m.recent[m.next][:0]
		m.recent[m.next] = append(p, b[off:min(off+seg, len(b))]...)
		m.next = (m.next + 1) % movingReplay
	}
	m.mu.Unlock()
}

// replay sends the recent packets, oldest first, over cc. After a carrier
// stalled they were most likely lost, and they are the connection's newest:
// arriving from a new address they make the server migrate and acknowledge
// at once, so the client's loss recovery resumes now, not when its probe
// timeout (backed off during the stall, often by many seconds) next fires.
// A copy that did arrive before is a duplicate, which QUIC discards.
func (m *MovingConn) replay(cc *CarrierConn) {
	m.mu.Lock()
	var ps [][]byte
	for i := range movingReplay {
		if p := m.recent[(m.next+i)%movingReplay]; len(p) > 0 {
			ps = append(ps, p)
		}
	}
	m.recent, m.next = [movingReplay][]byte{}, 0
	m.mu.Unlock()
	for _, p := range ps {
		_, _ = cc.WriteTo(p, m.server)
	}
}

// Kind is the carrier m sends over now.
func (m *MovingConn) Kind() string {
	if cc := m.Current(); cc != nil {
		return cc.Kind()
	}
	return wire.CarrierUDP
}

func (m *MovingConn) Current() *CarrierConn {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.carrier
}

func (m *MovingConn) MoveTo(cc *CarrierConn) {
	m.mu.Lock()
	old := m.carrier
	m.carrier = cc
	_ = cc.SetReadDeadline(m.rdl)
	m.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
	_ = m.udp.SetReadDeadline(time.Unix(1, 0)) // a reader waiting on UDP looks again
	m.replay(cc)
}

// MoveBack returns to the UDP socket.
func (m *MovingConn) MoveBack() {
	m.mu.Lock()
	old := m.carrier
	m.carrier = nil
	rdl := m.rdl
	m.mu.Unlock()
	_ = m.udp.SetReadDeadline(rdl) // MoveTo left it in the past
	if old != nil {
		_ = old.Close() // a reader blocked on it looks again, at UDP
	}
}

// ReadBatch reads packets as ipv4.PacketConn.ReadBatch does: from the UDP
// socket (several, coalesced bursts split), or one from the carrier.
func (m *MovingConn) ReadBatch(ms []ipv4.Message, flags int) (int, error) {
	for {
		if cc := m.Current(); cc != nil && m.rd.Buffered() == 0 { // what UDP brought first
			n, _, err := cc.ReadFrom(ms[0].Buffers[0])
			if errors.Is(err, net.ErrClosed) && m.Current() != cc {
				continue // moved on again
			}
			if err != nil {
				return 0, err
			}
			ms[0].N, ms[0].NN, ms[0].Flags, ms[0].Addr = n, 0, 0, m.server
			return 1, nil
		}
		n, err := m.rd.ReadBatch(ms, flags)
		if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			m.mu.Lock()
			moved, dl := m.carrier != nil, m.rdl
			m.mu.Unlock()
			if moved || dl.IsZero() || time.Now().Before(dl) {
				continue // MoveTo's wake-up, not the caller's deadline
			}
		}
		return n, err
	}
}

// ReadMsgUDP reads one packet.
func (m *MovingConn) ReadMsgUDP(b, oob []byte) (n, oobn, flags int, addr *net.UDPAddr, err error) {
	ms := []ipv4.Message{{Buffers: [][]byte{b}, OOB: oob}}
	if _, err = m.ReadBatch(ms, 0); err != nil {
		return 0, 0, 0, nil, err
	}
	addr, _ = ms[0].Addr.(*net.UDPAddr)
	return ms[0].N, ms[0].NN, ms[0].Flags, addr, nil
}

func (m *MovingConn) ReadFrom(b []byte) (int, net.Addr, error) {
	ms := []ipv4.Message{{Buffers: [][]byte{b}}}
	if _, err := m.ReadBatch(ms, 0); err != nil {
		return 0, nil, err
	}
	return ms[0].N, ms[0].Addr, nil
}

// WriteMsgUDP sends b (one packet, or a GSO send's packets when oob asks for
// segmentation) with its control messages over UDP, or its packets over the
// carrier.
func (m *MovingConn) WriteMsgUDP(b, oob []byte, addr *net.UDPAddr) (int, int, error) {
	seg := udpgro.SendSegmentSize(oob)
	m.remember(b, seg)
	if cc := m.Current(); cc != nil {
		if seg <= 0 {
			seg = len(b)
		}
		for off := 0; off < len(b); off += seg {
			if _, err := cc.WriteTo(b[off:min(off+seg, len(b))], addr); err != nil {
				return off, 0, err
			}
		}
		return len(b), len(oob), nil
	}
	n, oobn, err := m.udp.WriteMsgUDP(b, oob, addr)
	if seg > 0 && udpgro.IsSegmentationError(err) {
		return n, oobn, err // quic-go sends without GSO from now on
	}
	if m.udpWritten(err) {
		return len(b), len(oob), nil
	}
	return n, oobn, err
}

func (m *MovingConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	m.remember(b, 0)
	if cc := m.Current(); cc != nil {
		return cc.WriteTo(b, addr)
	}
	n, err := m.udp.WriteTo(b, addr)
	if m.udpWritten(err) {
		return len(b), nil
	}
	return n, err
}

// udpWritten notes how a write to the UDP socket went, and reports whether
// its error is to be hidden: a local firewall that drops UDP answers sendto
// with EPERM, a lost network with ENETUNREACH, and quic-go would close the
// connection on the error. The packet is lost instead, as on a network that
// drops it silently, and the Dialer moves the connection to a carrier.
func (m *MovingConn) udpWritten(err error) (hide bool) {
	if err == nil {
		m.udpFailing.Store(0)
		return false
	}
	m.udpFailing.CompareAndSwap(0, time.Now().UnixNano())
	return !errors.Is(err, net.ErrClosed)
}

// SyscallConn is the UDP socket's: quic-go sets its options (ECN, packet
// information, don't-fragment) and asks whether it takes GSO.
func (m *MovingConn) SyscallConn() (syscall.RawConn, error) { return m.udp.SyscallConn() }

// configFor is qcfg for a connection on pc: on a MovingConn, without path MTU
// discovery, as before quic-go saw the socket under it. quic-go does not see
// a move, so a packet size learnt on one path (a carrier carries any) would
// stay on the next, where larger packets may be dropped, silently: a move
// hides UDP's write errors.
func configFor(pc net.PacketConn, qcfg *quic.Config) *quic.Config {
	if _, ok := pc.(*MovingConn); !ok || qcfg == nil {
		return qcfg
	}
	c := qcfg.Clone()
	c.DisablePathMTUDiscovery = true
	return c
}

func (m *MovingConn) SetReadDeadline(t time.Time) error {
	m.mu.Lock()
	m.rdl = t
	cc := m.carrier
	m.mu.Unlock()
	if cc != nil {
		_ = cc.SetReadDeadline(t)
	}
	return m.udp.SetReadDeadline(t)
}

func (m *MovingConn) Close() error {
	if cc := m.Current(); cc != nil {
		_ = cc.Close()
	}
	return m.udp.Close()
}

func (m *MovingConn) SetDeadline(t time.Time) error      { return m.SetReadDeadline(t) }
func (m *MovingConn) SetWriteDeadline(t time.Time) error { return m.udp.SetWriteDeadline(t) }
func (m *MovingConn) LocalAddr() net.Addr                { return m.udp.LocalAddr() }

// SetReadBuffer and SetWriteBuffer size the UDP socket's buffers, which
// quic-go asks for (and warns without).
func (m *MovingConn) SetReadBuffer(n int) error  { return m.udp.SetReadBuffer(n) }
func (m *MovingConn) SetWriteBuffer(n int) error { return m.udp.SetWriteBuffer(n) }
