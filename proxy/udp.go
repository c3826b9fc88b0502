package proxy

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/authz"
)

// UDPOptions bound UDP flows (op "dial", net "udp"). Zero values take the defaults.
type UDPOptions struct {
	// IdleTimeout ends a flow that carried no datagram either way for this long. Default 60s.
	IdleTimeout time.Duration
	// MaxFlowsPerConn bounds the flows open at once on one QUIC connection. Default 64.
	MaxFlowsPerConn int
	// MaxFlowsPerIdentity bounds the flows open at once for one device identity,
	// over all its connections and transports. Default 256.
	MaxFlowsPerIdentity int
	// QueueLen bounds the datagrams waiting per flow; beyond it they are dropped
	// and counted. Default DefaultUDPQueueLen.
	QueueLen int
	// MaxPublicFlows bounds the public clients (source addresses) one public UDP
	// port serves at once; datagrams from further clients are dropped and
	// counted in FlowsRefused. Default 512.
	MaxPublicFlows int
}

func (o UDPOptions) withDefaults() UDPOptions {
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = wire.DefaultUDPIdle
	}
	if o.MaxFlowsPerConn <= 0 {
		o.MaxFlowsPerConn = 64
	}
	if o.MaxFlowsPerIdentity <= 0 {
		o.MaxFlowsPerIdentity = 256
	}
	if o.QueueLen <= 0 {
		o.QueueLen = wire.DefaultUDPQueueLen
	}
	if o.MaxPublicFlows <= 0 {
		o.MaxPublicFlows = 512
	}
	return o
}

// UDPStats are a server's UDP counters since it started.
type UDPStats struct {
	Active, Flows, FlowsRefused int64 // flows open now, served, refused by the bounds
	DatagramsUp, DatagramsDown  int64 // client→destination, destination→client
	// Dropped datagrams, by reason: queue full (a flood), too large for the
	// destination path, and refused by the destination (ICMP port unreachable).
	QueueFull, TooLarge, DestRefused int64
	// Oversize counts datagrams that fit no QUIC DATAGRAM frame and took the stream.
	Oversize int64
	// QUICQueueFull counts DATAGRAM frames from clients that the QUIC stack
	// discarded because its receive queue was full, before any flow saw them.
	QUICQueueFull int64
	// QUICPacketQueueFull counts packets from clients that the QUIC stack
	// discarded unread because its queue of unprocessed packets was full.
	QUICPacketQueueFull int64
	// NoFlow counts DATAGRAM frames from clients that named no live flow:
	// late, after their flow ended (sent just before the client closed it),
	// or malformed.
	NoFlow int64
}

// udpState counts a server's UDP flows for the bounds and UDPStats.
type udpState struct {
	mu      sync.Mutex
	perID   map[string]int
	perConn map[*quic.Conn]int

	active, flows, refused, up, down, queueFull, tooLarge, dstRefused, oversize atomic.Int64
	quicDrops                                                                   wire.DatagramDropCounter
}

// UDPStats returns the server's UDP counters.
func (s *Server) UDPStats() UDPStats {
	u := &s.udp
	return UDPStats{
		Active: u.active.Load(), Flows: u.flows.Load(), FlowsRefused: u.refused.Load(),
		DatagramsUp: u.up.Load(), DatagramsDown: u.down.Load(),
		QueueFull: u.queueFull.Load(), TooLarge: u.tooLarge.Load(), DestRefused: u.dstRefused.Load(),
		Oversize: u.oversize.Load(), QUICQueueFull: u.quicDrops.Dropped(), QUICPacketQueueFull: u.quicDrops.PacketsDropped(),
		NoFlow: u.quicDrops.NoFlow(),
	}
}

// acquire takes a flow slot for identity id on conn (nil for TLS).
func (u *udpState) acquire(id string, conn *quic.Conn, o UDPOptions) (release func(), herr *wire.HelloError) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.perID == nil {
		u.perID, u.perConn = make(map[string]int), make(map[*quic.Conn]int)
	}
	if u.perID[id] >= o.MaxFlowsPerIdentity {
		u.refused.Add(1)
		return nil, wire.Errorf(wire.CodeTooManyFlows, "%s already has %d UDP flows open, the server's limit per identity; close some or let them expire (idle after %s)", id, u.perID[id], o.IdleTimeout)
	}
	if conn != nil && u.perConn[conn] >= o.MaxFlowsPerConn {
		u.refused.Add(1)
		return nil, wire.Errorf(wire.CodeTooManyFlows, "this connection already has %d UDP flows open, the server's limit per connection; close some or let them expire (idle after %s)", u.perConn[conn], o.IdleTimeout)
	}
	u.perID[id]++
	if conn != nil {
		u.perConn[conn]++
	}
	u.active.Add(1)
	u.flows.Add(1)
	return func() {
		u.mu.Lock()
		defer u.mu.Unlock()
		if u.perID[id]--; u.perID[id] <= 0 {
			delete(u.perID, id)
		}
		if conn != nil {
			if u.perConn[conn]--; u.perConn[conn] <= 0 {
				delete(u.perConn, conn)
			}
		}
		u.active.Add(-1)
	}, nil
}

// serveUDP runs an authorised UDP flow: upstream is the connected UDP socket to
// the destination. It answers the client, relays datagrams both ways until the
// flow is idle for IdleTimeout, either side ends it, the certificate expires or a
// re-check revokes it, and fills ss for the session's log line.
func (s *Server) serveUDP(ctx context.Context, conn wire.Stream, cs tls.ConnectionState, ss *session, upstream net.Conn) {
	defer upstream.Close()
	o := s.cfg.UDP.withDefaults()
	var qconn *quic.Conn
	if qs, ok := conn.(wire.QUICStreamer); ok {
		qconn = qs.Conn()
	}
	release, herr := s.udp.acquire(ss.id.String(), qconn, o)
	if herr != nil {
		ss.code, ss.end = herr.Code, herr.Error()
		s.refuse(conn, herr)
		return
	}
	defer release()

	flow, err := wire.NewUDPFlow(conn, o.QueueLen, nil)
	if err != nil {
		ss.code, ss.end = wire.CodeInternal, err.Error()
		s.refuse(conn, wire.Errorf(wire.CodeInternal, "%v", err))
		return
	}
	defer flow.Close()
	flow.CountNoFlow(&s.udp.quicDrops)
	hello := wire.ServerHello{V: wire.Version, OK: true}
	if id, ok := flow.FlowID(); ok {
		hello.Flow = &id
	}
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, hello); err != nil {
		ss.end = "writing server hello: " + err.Error()
		return
	}
	_ = conn.SetWriteDeadline(time.Time{})
	flow.Start()

	bctx, cancel := context.WithDeadlineCause(ctx, ss.id.NotAfter, wire.ErrCertExpired)
	defer cancel()
	bctx, revoke := context.WithCancelCause(bctx)
	defer revoke(nil)
	defer s.sessions.add(&liveSession{cs: cs, req: ss.req, revoke: revoke})()

	r := wire.RelayUDP(bctx, flow, upstream, o.IdleTimeout)
	st := flow.Stats()
	s.udp.up.Add(st.DatagramsIn)
	s.udp.down.Add(st.DatagramsOut)
	s.udp.queueFull.Add(st.QueueFull)
	s.udp.tooLarge.Add(st.TooLarge)
	s.udp.oversize.Add(st.Oversize)
	s.udp.dstRefused.Add(r.Refused)
	ss.up, ss.down, ss.end = st.BytesIn, st.BytesOut, r.End
	ss.attrs = append(ss.attrs, udpAttrs(st, r.Refused)...)
}

// udpAttrs are a flow's counters for its log line.
func udpAttrs(st wire.UDPFlowStats, refused int64) []slog.Attr {
	attrs := []slog.Attr{
		slog.String("network", "udp"),
		slog.Int64("datagrams_up", st.DatagramsIn),
		slog.Int64("datagrams_down", st.DatagramsOut),
	}
	for _, c := range []struct {
		name string
		v    int64
	}{{"dropped_queue_full", st.QueueFull}, {"dropped_too_large", st.TooLarge}, {"largest_dropped", st.Largest}, {"oversize_on_stream", st.Oversize}, {"dest_refused", refused}} {
		if c.v > 0 {
			attrs = append(attrs, slog.Int64(c.name, c.v))
		}
	}
	return attrs
}

// dialAction is the policy action for a dial on network.
func dialAction(network string) string {
	if network == "udp" {
		return authz.ActionDialUDP
	}
	return authz.ActionDial
}
