package transport

// Moving a live QUIC connection to another carrier (docs/PROTOCOL.md,
// "Carriers"): when the carrier under the Client's connection stops
// delivering (packets go out, nothing comes back for CarrierStall), the Client
// opens the next carrier of FallbackCarriers, adds it to the connection as a
// the socket under the connection (MovingConn). The connection, its streams and
// datagram flows continue; the server sees the client at a new address and
// migrates as it does for NAT rebinding.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// DefaultCarrierStall is Client.CarrierStall when zero.
const DefaultCarrierStall = 3 * time.Second

// carrierSwitch is one move of the connection.
type carrierSwitch struct{ kind string }

func (cl *Client) carrierStall() time.Duration {
	if cl.CarrierStall > 0 {
		return cl.CarrierStall
	}
	return DefaultCarrierStall
}

// watchCarrier runs while conn lives on mc: it samples conn's packet
// counters and moves conn to another carrier when its carrier stalls
// (packets went out, nothing came back for CarrierStall), and, with auto, it
// probes UDP every UDPReprobe while conn is on a stream carrier and moves conn
// back to UDP when the probe's handshake completes. mc is the Client's packet
// conn, or an agent's own (agent.go).
func (cl *Client) watchCarrier(conn *quic.Conn, mc *MovingConn) {
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
		if cl.racesCarriers() && mc.Kind() != wire.CarrierUDP && time.Since(lastProbe) >= cl.udpReprobe() {
			lastProbe = time.Now()
			if cl.probeUDP(ctx, mc.ServerAddr()) {
				start := time.Now()
				if err := cl.moveToUDP(mc); err == nil {
					cl.logf("tp: UDP gets through again; the connection moved back to UDP in %s", time.Since(start).Round(time.Millisecond))
					cl.rememberCarrier(wire.CarrierUDP)
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
		if mc.UDPWritesFailing() < localFailure {
			if st.PacketsReceived != lastRecv {
				lastRecv, sentAtRecv, recvAt = st.PacketsReceived, st.PacketsSent, time.Now()
				clear(tried)
				gaveUp = false
				continue
			}
			if st.PacketsSent == sentAtRecv || time.Since(recvAt) < cl.carrierStall() {
				continue
			}
		}
		cur := mc.Kind()
		kind := ""
		for _, k := range cl.fallbacks() {
			if k != cur && !tried[k] {
				kind = k
				break
			}
		}
		if kind == "" {
			if !gaveUp {
				cl.logf("tp: the %s carrier stopped delivering and no further carrier is left to try", cur)
				gaveUp = true
			}
			recvAt = time.Now() // look again after another stall
			continue
		}
		tried[kind] = true
		start := time.Now()
		if err := cl.moveTo(ctx, mc, kind); err != nil {
			cl.logf("tp: the %s carrier stopped delivering; moving to %s failed: %v", cur, kind, err)
			continue
		}
		cl.logf("tp: the %s carrier stopped delivering; the connection moved to %s in %s", cur, kind, time.Since(start).Round(time.Millisecond))
		cl.rememberCarrier(kind)
		reset()
	}
}

// localFailure is how long writes to UDP must fail before the connection moves.
const localFailure = 300 * time.Millisecond

// moveTo opens carrier kind and makes mc (the Client's packet conn, or an
// agent's) send and receive over it from now on.
func (cl *Client) moveTo(ctx context.Context, mc *MovingConn, kind string) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if mc == nil {
		return fmt.Errorf("the connection cannot move: it does not run on a movable packet conn")
	}
	dial, err := cl.carrierDialer(kind)
	if err != nil {
		return err
	}
	cc, err := NewCarrierConn(ctx, kind, cl.Server, dial)
	if err != nil {
		return err
	}
	mc.MoveTo(cc)
	cl.noteMove(mc, kind)
	return nil
}

// noteMove records a move of the Client's own connection (CurrentCarrier).
func (cl *Client) noteMove(mc *MovingConn, kind string) {
	q := &cl.quic
	q.mu.Lock()
	if q.udp == net.PacketConn(mc) {
		q.moves = append(q.moves, carrierSwitch{kind: kind})
	}
	q.mu.Unlock()
}

// DefaultCarrierUDPTry bounds the first handshake over UDP when the Client
// has carriers to fall back to.
const DefaultCarrierUDPTry = 2 * time.Second

// fallbacks are the carriers the connection may move to: FallbackCarriers, or
// tls, ws, then http when connecting races the carriers.
func (cl *Client) fallbacks() []string {
	if len(cl.FallbackCarriers) == 0 && cl.racesCarriers() {
		return []string{wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP}
	}
	return cl.FallbackCarriers
}

// dialFallingBack dials over tr; with fallbacks, a first handshake over UDP
// that gets no answer within DefaultCarrierUDPTry is tried again over each
// fallback carrier in turn, on the same socket (MovingConn), moved first.
func (cl *Client) dialFallingBack(ctx context.Context, tr *quic.Transport, raddr net.Addr, cfg *tls.Config, qcfg *quic.Config) (*quic.Conn, error) {
	mc, _ := tr.Conn.(*MovingConn)
	if mc == nil || mc.Current() != nil {
		return tr.Dial(ctx, raddr, cfg, qcfg)
	}
	fallbacks := cl.fallbacks()
	var errs []error
	// A carrier that worked here recently is tried first, without the UDP try.
	if kind := cl.cachedCarrier(); kind != "" && slices.Contains(fallbacks, kind) {
		if err := cl.moveTo(ctx, mc, kind); err == nil {
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
			cl.rememberCarrier(wire.CarrierUDP)
		}
		if err == nil || ctx.Err() != nil || !(uctx.Err() != nil || errors.As(err, new(*quic.HandshakeTimeoutError))) {
			return conn, err
		}
		errs = append(errs, fmt.Errorf("over udp: %w", err))
	}
	for _, kind := range fallbacks {
		if err := cl.moveTo(ctx, mc, kind); err != nil {
			errs = append(errs, fmt.Errorf("over %s: %w", kind, err))
			continue
		}
		conn, err := tr.Dial(ctx, raddr, cfg, qcfg)
		if err == nil {
			cl.logf("tp: no answer over UDP; connected over the %s carrier", kind)
			cl.rememberCarrier(kind)
			return conn, nil
		}
		errs = append(errs, fmt.Errorf("over %s: %w", kind, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

// cachedCarrier is the carrier remembered for the server in the Client's
// Cache (under "carrier:" + Server, beside the transport), "" when none.
func (cl *Client) cachedCarrier() string {
	if cl.Cache == nil {
		return ""
	}
	return cl.Cache.Get(CarrierKeyPrefix + cl.Server)
}

// rememberCarrier remembers kind for the server on this network: UDP for the
// cache's TTL, a stream carrier for DefaultFallbackTTL only, after which the
// next connection races UDP again.
func (cl *Client) rememberCarrier(kind string) {
	if cl.Cache != nil {
		ttl := time.Duration(0)
		if kind != wire.CarrierUDP {
			ttl = DefaultFallbackTTL
		}
		_ = cl.Cache.PutFor(CarrierKeyPrefix+cl.Server, kind, ttl) // an unwritable cache only costs a UDP try
	}
}

// CurrentCarrier is the carrier the connection uses now.
func (cl *Client) CurrentCarrier() string {
	q := &cl.quic
	q.mu.Lock()
	defer q.mu.Unlock()
	if n := len(q.moves); n > 0 {
		return q.moves[n-1].kind
	}
	return cl.carrier()
}

func (cl *Client) logf(format string, args ...any) {
	if cl.Logf != nil {
		cl.Logf(format, args...)
	}
}
