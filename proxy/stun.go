package proxy

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/stun/v4"
	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/carrier"
)

// STUN on the QUIC port: tpd answers STUN Binding requests (RFC 8489) that
// arrive on its UDP socket with the address and port it saw them come from
// (XOR-MAPPED-ADDRESS), so that a device learns the address a NAT gave it
// without a third party, as ICE needs for a direct path between two devices.
// STUN and QUIC share the socket as RFC 7983 describes: a STUN message starts
// with two zero bits, which no QUIC packet does (quic-go hands such packets to
// ReadNonQUICPacket). Nothing is authenticated and nothing is learnt but the
// sender's own address. A response is at most 52 bytes against a request of at
// least 20, and each source gets at most stunPerSource answers a second, the
// socket stunPerSecond in all: a spoofed source gets little. On the socket
// the carrier mux wraps, the mux answers (carrier.Mux.SetNonQUIC), from the
// address each request reached; on a second socket, serveSTUN reads quic-go's
// non-QUIC packets, which come without that address, and the kernel picks the
// answer's source.

const (
	stunPerSource  = 10     // answers per source (an IPv4 address, an IPv6 /64) and second
	stunPerSecond  = 10_000 // answers per second and socket, all sources together
	stunMaxSources = 4_096  // sources counted in one second; more are refused until the next
	stunMaxRequest = 548    // longer datagrams are no Binding request worth answering
)

// STUNStats count the datagrams the QUIC socket received that were no QUIC.
type STUNStats struct {
	// Answered Binding requests; RateLimited ones not answered (their
	// source, or the server, over its rate); Malformed: the other non-QUIC
	// datagrams (no STUN Binding request, or one that came over a stream
	// carrier, where its source means nothing).
	Answered, RateLimited, Malformed int64
}

type stunCounters struct{ answered, limited, malformed atomic.Int64 }

func (c *stunCounters) stats() STUNStats {
	return STUNStats{Answered: c.answered.Load(), RateLimited: c.limited.Load(), Malformed: c.malformed.Load()}
}

// stunLimiter counts answers per source address within the current second.
type stunLimiter struct {
	mu     sync.Mutex
	second int64
	total  int
	per    map[netip.Prefix]int
}

func (l *stunLimiter) allow(addr netip.Addr, now time.Time) bool {
	src := carrier.SourcePrefix(addr) // as the carriers' bounds count
	l.mu.Lock()
	defer l.mu.Unlock()
	if s := now.Unix(); s != l.second || l.per == nil {
		l.second, l.total, l.per = s, 0, make(map[netip.Prefix]int)
	}
	n, known := l.per[src]
	if l.total >= stunPerSecond || n >= stunPerSource || !known && len(l.per) >= stunMaxSources {
		return false
	}
	l.per[src] = n + 1
	l.total++
	return true
}

// serveSTUN answers the Binding requests among tr's non-QUIC packets until
// ctx ends.
func (s *Server) serveSTUN(ctx context.Context, tr *quic.Transport) {
	var lim stunLimiter
	buf := make([]byte, 1500)
	for {
		n, from, err := tr.ReadNonQUICPacket(ctx, buf)
		if err != nil {
			return // ctx ended or the transport closed
		}
		if resp := s.stunAnswer(buf[:n], from, &lim, time.Now()); resp != nil {
			_, _ = tr.WriteTo(resp, from)
		}
	}
}

// stunAnswer is the response to the datagram b from from, or nil when it gets
// none (counted).
func (s *Server) stunAnswer(b []byte, from net.Addr, lim *stunLimiter, now time.Time) []byte {
	c := &s.stats.stun
	ua, ok := from.(*net.UDPAddr)
	if !ok || len(b) > stunMaxRequest || !stun.IsMessage(b) {
		c.malformed.Add(1)
		return nil
	}
	m := &stun.Message{Raw: append([]byte(nil), b...)}
	if err := m.Decode(); err != nil || m.Type != stun.BindingRequest {
		c.malformed.Add(1)
		return nil
	}
	if m.Contains(stun.AttrFingerprint) {
		if err := stun.Fingerprint.Check(m); err != nil {
			c.malformed.Add(1)
			return nil
		}
	}
	src := ua.AddrPort()
	if carrier.IsVirtual(src.Addr()) {
		c.malformed.Add(1)
		return nil
	}
	if !lim.allow(src.Addr().Unmap(), now) {
		c.limited.Add(1)
		return nil
	}
	ip := src.Addr().Unmap()
	resp, err := stun.Build(stun.NewTransactionIDSetter(m.TransactionID), stun.BindingSuccess,
		&stun.XORMappedAddress{IP: ip.AsSlice(), Port: int(src.Port())}, stun.Fingerprint)
	if err != nil {
		c.malformed.Add(1)
		return nil
	}
	c.answered.Add(1)
	return resp.Raw
}
