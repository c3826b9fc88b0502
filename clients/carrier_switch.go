package clients

// Moving a live QUIC connection to another carrier (docs/PROTOCOL.md,
// "Carriers"): when the carrier under the Dialer's connection stops
// delivering (packets go out, nothing comes back for CarrierStall), the Dialer
// opens the next carrier of FallbackCarriers, adds it to the connection as a
// the socket under the connection (movingConn). The connection, its streams and
// datagram flows continue; the server sees the client at a new address and
// migrates as it does for NAT rebinding.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// DefaultCarrierStall is Dialer.CarrierStall when zero.
const DefaultCarrierStall = 3 * time.Second

// carrierSwitch is one move of the connection.
type carrierSwitch struct{ kind string }

func (d *Dialer) carrierStall() time.Duration {
	if d.CarrierStall > 0 {
		return d.CarrierStall
	}
	return DefaultCarrierStall
}

// watchCarrier runs while conn lives on mc: it samples conn's packet
// counters and moves conn to another carrier when its carrier stalls
// (packets went out, nothing came back for CarrierStall), and, with auto, it
// probes UDP every UDPReprobe while conn is on a stream carrier and moves conn
// back to UDP when the probe's handshake completes. mc is the Dialer's packet
// conn, or an agent's own (carrier_agent.go).
func (d *Dialer) watchCarrier(conn *quic.Conn, mc *movingConn) {
	ctx := conn.Context()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	st := conn.ConnectionStats()
	lastRecv, sentAtRecv, recvAt := st.PacketsReceived, st.PacketsSent, time.Now()
	reset := func() {
		st = conn.ConnectionStats()
		lastRecv, sentAtRecv, recvAt = st.PacketsReceived, st.PacketsSent, time.Now()
	}
	tried := map[string]bool{} // carriers moved to since a packet last came in
	lastProbe, gaveUp := time.Now(), false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if d.racesCarriers() && mc.kind() != wire.CarrierUDP && time.Since(lastProbe) >= d.udpReprobe() {
			lastProbe = time.Now()
			if d.probeUDP(ctx, mc.server) {
				start := time.Now()
				if err := d.moveToUDP(mc); err == nil {
					d.logf("tp: UDP gets through again; the connection moved back to UDP in %s", time.Since(start).Round(time.Millisecond))
					d.rememberCarrier(wire.CarrierUDP)
					clear(tried)
					reset()
					continue
				}
			}
		}
		st = conn.ConnectionStats()
		// Writes to UDP that fail (a local firewall's EPERM, a lost route) stop
		// the carrier at once; otherwise a carrier stalls when packets went
		// out and nothing came back for CarrierStall.
		if mc.udpWritesFailing() < localFailure {
			if st.PacketsReceived != lastRecv {
				lastRecv, sentAtRecv, recvAt = st.PacketsReceived, st.PacketsSent, time.Now()
				clear(tried)
				gaveUp = false
				continue
			}
			if st.PacketsSent == sentAtRecv || time.Since(recvAt) < d.carrierStall() {
				continue
			}
		}
		cur := mc.kind()
		kind := ""
		for _, k := range d.fallbacks() {
			if k != cur && !tried[k] {
				kind = k
				break
			}
		}
		if kind == "" {
			if !gaveUp {
				d.logf("tp: the %s carrier stopped delivering and no further carrier is left to try", cur)
				gaveUp = true
			}
			recvAt = time.Now() // look again after another stall
			continue
		}
		tried[kind] = true
		start := time.Now()
		if err := d.moveTo(ctx, mc, kind); err != nil {
			d.logf("tp: the %s carrier stopped delivering; moving to %s failed: %v", cur, kind, err)
			continue
		}
		d.logf("tp: the %s carrier stopped delivering; the connection moved to %s in %s", cur, kind, time.Since(start).Round(time.Millisecond))
		d.rememberCarrier(kind)
		reset()
	}
}

// localFailure is how long writes to UDP must fail before the connection moves.
const localFailure = 300 * time.Millisecond

// moveTo opens carrier kind and makes mc (the Dialer's packet conn, or an
// agent's) send and receive over it from now on.
func (d *Dialer) moveTo(ctx context.Context, mc *movingConn, kind string) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if mc == nil {
		return fmt.Errorf("the connection cannot move: it does not run on a movable packet conn")
	}
	dial, err := d.carrierDialer(kind)
	if err != nil {
		return err
	}
	cc, err := transport.NewCarrierConn(ctx, kind, d.Server, dial)
	if err != nil {
		return err
	}
	mc.moveTo(cc)
	d.noteMove(mc, kind)
	return nil
}

// noteMove records a move of the Dialer's own connection (CurrentCarrier).
func (d *Dialer) noteMove(mc *movingConn, kind string) {
	q := &d.quic
	q.mu.Lock()
	if q.udp == net.PacketConn(mc) {
		q.moves = append(q.moves, carrierSwitch{kind: kind})
	}
	q.mu.Unlock()
}

// movingConn is the packet conn of a Dialer with FallbackCarriers: UDP until
// moveTo, then the carrier's conn. quic-go sees one socket whose packets now
// leave from elsewhere; the server sees the client at a new address (the
// carrier session's) and migrates, validating the new path, as after a NAT
// rebinding. (quic-go's own Conn.AddPath cannot do this: it sends path probes
// only while the congestion window lets it send, which a connection whose
// path died with data in flight never does again.)
//
// It wraps the UDP socket, so quic-go on the client loses GSO and batched
// reads (carrier "udp" without fallback keeps them).
type movingConn struct {
	udp    *net.UDPConn
	server net.Addr // what reads from a carrier say they came from

	mu      sync.Mutex
	carrier *transport.CarrierConn
	rdl     time.Time
	// recent are the last packets written (a ring of movingReplay), sent again
	// over the next carrier on a move: see moveTo.
	recent [movingReplay][]byte
	next   int
	// udpFailing is when writes to the UDP socket began to fail, without a
	// success since (unix nanoseconds; 0: the last write went out).
	udpFailing atomic.Int64
}

// udpWritesFailing is how long every write to the UDP socket has failed.
func (m *movingConn) udpWritesFailing() time.Duration {
	if f := m.udpFailing.Load(); f != 0 && m.current() == nil {
		return time.Since(time.Unix(0, f))
	}
	return 0
}

// movingReplay is how many of the last packets a move sends again.
const movingReplay = 4

// remember keeps a copy of b among the recent packets.
func (m *movingConn) remember(b []byte) {
	m.mu.Lock()
	p := m.recent[m.next][:0]
	m.recent[m.next] = append(p, b...)
	m.next = (m.next + 1) % movingReplay
	m.mu.Unlock()
}

// replay sends the recent packets, oldest first, over cc. After a carrier
// stalled they were most likely lost, and they are the connection's newest:
// arriving from a new address they make the server migrate and acknowledge
// at once, so the client's loss recovery resumes now, not when its probe
// timeout (backed off during the stall, often by many seconds) next fires.
// A copy that did arrive before is a duplicate, which QUIC discards.
func (m *movingConn) replay(cc *transport.CarrierConn) {
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

// kind is the carrier m sends over now.
func (m *movingConn) kind() string {
	if cc := m.current(); cc != nil {
		return cc.Kind()
	}
	return wire.CarrierUDP
}

func (m *movingConn) current() *transport.CarrierConn {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.carrier
}

func (m *movingConn) moveTo(cc *transport.CarrierConn) {
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

// moveBack returns to the UDP socket.
func (m *movingConn) moveBack() {
	m.mu.Lock()
	old := m.carrier
	m.carrier = nil
	rdl := m.rdl
	m.mu.Unlock()
	_ = m.udp.SetReadDeadline(rdl) // moveTo left it in the past
	if old != nil {
		_ = old.Close() // a reader blocked on it looks again, at UDP
	}
}

func (m *movingConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		if cc := m.current(); cc != nil {
			n, _, err := cc.ReadFrom(b)
			if errors.Is(err, net.ErrClosed) && m.current() != cc {
				continue // moved on again
			}
			return n, m.server, err
		}
		n, addr, err := m.udp.ReadFrom(b)
		if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			m.mu.Lock()
			moved, dl := m.carrier != nil, m.rdl
			m.mu.Unlock()
			if moved || dl.IsZero() || time.Now().Before(dl) {
				continue
			}
		}
		return n, addr, err
	}
}

func (m *movingConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	m.remember(b)
	if cc := m.current(); cc != nil {
		return cc.WriteTo(b, addr)
	}
	n, err := m.udp.WriteTo(b, addr)
	if err == nil {
		m.udpFailing.Store(0)
	} else {
		m.udpFailing.CompareAndSwap(0, time.Now().UnixNano())
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		// A local firewall that drops UDP answers sendto with EPERM, a lost
		// network with ENETUNREACH: quic-go would close the connection on the
		// error. The packet is lost instead, as on a network that drops it
		// silently, and watchCarrier moves the connection to a carrier.
		return len(b), nil
	}
	return n, err
}

func (m *movingConn) SetReadDeadline(t time.Time) error {
	m.mu.Lock()
	m.rdl = t
	cc := m.carrier
	m.mu.Unlock()
	if cc != nil {
		_ = cc.SetReadDeadline(t)
	}
	return m.udp.SetReadDeadline(t)
}

func (m *movingConn) Close() error {
	if cc := m.current(); cc != nil {
		_ = cc.Close()
	}
	return m.udp.Close()
}

func (m *movingConn) SetDeadline(t time.Time) error      { return m.SetReadDeadline(t) }
func (m *movingConn) SetWriteDeadline(t time.Time) error { return m.udp.SetWriteDeadline(t) }
func (m *movingConn) LocalAddr() net.Addr                { return m.udp.LocalAddr() }

// SetReadBuffer and SetWriteBuffer size the UDP socket's buffers, which
// quic-go asks for (and warns without).
func (m *movingConn) SetReadBuffer(n int) error  { return m.udp.SetReadBuffer(n) }
func (m *movingConn) SetWriteBuffer(n int) error { return m.udp.SetWriteBuffer(n) }

// DefaultCarrierUDPTry bounds the first handshake over UDP when the Dialer
// has carriers to fall back to.
const DefaultCarrierUDPTry = 2 * time.Second

// fallbacks are the carriers the connection may move to: FallbackCarriers, or
// tls, ws, then http when connecting races the carriers.
func (d *Dialer) fallbacks() []string {
	if len(d.FallbackCarriers) == 0 && d.racesCarriers() {
		return []string{wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP}
	}
	return d.FallbackCarriers
}

// dialFallingBack dials over tr; with fallbacks, a first handshake over UDP
// that gets no answer within DefaultCarrierUDPTry is tried again over each
// fallback carrier in turn, on the same socket (movingConn), moved first.
func (d *Dialer) dialFallingBack(ctx context.Context, tr *quic.Transport, raddr net.Addr, cfg *tls.Config, qcfg *quic.Config) (*quic.Conn, error) {
	mc, _ := tr.Conn.(*movingConn)
	if mc == nil || mc.current() != nil {
		return tr.Dial(ctx, raddr, cfg, qcfg)
	}
	fallbacks := d.fallbacks()
	var errs []error
	// A carrier that worked here recently is tried first, without the UDP try.
	if kind := d.cachedCarrier(); kind != "" && slices.Contains(fallbacks, kind) {
		if err := d.moveTo(ctx, mc, kind); err == nil {
			conn, err := tr.Dial(ctx, raddr, cfg, qcfg)
			if err == nil || ctx.Err() != nil {
				return conn, err
			}
			errs = append(errs, fmt.Errorf("over %s (remembered): %w", kind, err))
		}
		fallbacks = slices.DeleteFunc(slices.Clone(fallbacks), func(k string) bool { return k == kind })
	} else {
		uctx, cancel := context.WithTimeout(ctx, DefaultCarrierUDPTry)
		conn, err := tr.Dial(uctx, raddr, cfg, qcfg)
		cancel()
		if err == nil {
			d.rememberCarrier(wire.CarrierUDP)
		}
		if err == nil || ctx.Err() != nil || !(uctx.Err() != nil || errors.As(err, new(*quic.HandshakeTimeoutError))) {
			return conn, err
		}
		errs = append(errs, fmt.Errorf("over udp: %w", err))
	}
	for _, kind := range fallbacks {
		if err := d.moveTo(ctx, mc, kind); err != nil {
			errs = append(errs, fmt.Errorf("over %s: %w", kind, err))
			continue
		}
		conn, err := tr.Dial(ctx, raddr, cfg, qcfg)
		if err == nil {
			d.logf("tp: no answer over UDP; connected over the %s carrier", kind)
			d.rememberCarrier(kind)
			return conn, nil
		}
		errs = append(errs, fmt.Errorf("over %s: %w", kind, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

// cachedCarrier is the carrier remembered for the server in the Dialer's
// Cache (under "carrier:" + Server, beside the transport), "" when none.
func (d *Dialer) cachedCarrier() string {
	if d.Cache == nil {
		return ""
	}
	return d.Cache.Get(transport.CarrierKeyPrefix + d.Server)
}

// rememberCarrier remembers kind for the server on this network: UDP for the
// cache's TTL, a stream carrier for DefaultFallbackTTL only, after which the
// next connection races UDP again.
func (d *Dialer) rememberCarrier(kind string) {
	if d.Cache != nil {
		ttl := time.Duration(0)
		if kind != wire.CarrierUDP {
			ttl = DefaultFallbackTTL
		}
		_ = d.Cache.PutFor(transport.CarrierKeyPrefix+d.Server, kind, ttl) // an unwritable cache only costs a UDP try
	}
}

// currentCarrier is the carrier the connection uses now.
func (d *Dialer) currentCarrier() string {
	q := &d.quic
	q.mu.Lock()
	defer q.mu.Unlock()
	if n := len(q.moves); n > 0 {
		return q.moves[n-1].kind
	}
	return d.carrier()
}

// CurrentCarrier is the carrier the Dialer's QUIC connection uses now: its
// Carrier, or the last one it moved to.
func (d *Dialer) CurrentCarrier() string { return d.currentCarrier() }

func (d *Dialer) logf(format string, args ...any) {
	if d.Logf != nil {
		d.Logf(format, args...)
	}
}
