package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"
)

// UDP reverse listeners (docs/PROTOCOL.md, section 11.6). An agent lists in its
// listen hello the names whose local service is UDP. Their sessions carry
// datagrams as capsules (wire/udpwire.go) instead of a byte stream:
//
//   - A TP client dials such a name with net "udp" (tp forward --udp). The relay
//     splices the client's stream to the agent's like a TCP session; for a
//     protected name the capsules travel inside the end-to-end TLS session.
//   - A public UDP port (PublicSpec with net "udp") is a UDP socket on the
//     server. Each public client, by source address, becomes one session to the
//     agent, a UDPFlow on which the server relays that client's datagrams; over
//     QUIC they also travel in DATAGRAM frames once the agent has answered.

// publicUDPRetry is how long a public UDP client whose session could not be
// opened (agent offline, busy) has its datagrams dropped before another attempt:
// a client that keeps sending does not make the server open a session per datagram.
const publicUDPRetry = time.Second

// publicUDPClient is one public client of a public UDP port.
type publicUDPClient struct {
	src   netip.AddrPort
	queue chan []byte // datagrams from the client not yet sent to the agent
}

// servePublicUDP reads a public UDP port until it closes, handing each public
// client's datagrams to that client's session.
func (s *Server) servePublicUDP(pl *reverse.PublicListener) {
	s.log.Info("public port open", "addr", pl.Addr().String(), "exposure", reverse.DescribeKey(pl.Key))
	o := s.cfg.UDP.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	var (
		mu      sync.Mutex
		clients = map[netip.AddrPort]*publicUDPClient{}
		wg      sync.WaitGroup
	)
	defer func() {
		cancel()
		wg.Wait()
		s.log.Info("public port closed", "addr", pl.Addr().String(), "exposure", reverse.DescribeKey(pl.Key))
	}()
	buf := make([]byte, wire.MaxDatagramSize)
	for {
		n, src, err := pl.PC.ReadFromUDPAddrPort(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Warn("public UDP port read failed; closing it", "addr", pl.Addr().String(), "err", err)
				_ = pl.Close()
			}
			return
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		mu.Lock()
		c := clients[src]
		if c == nil {
			if len(clients) >= o.MaxPublicFlows {
				mu.Unlock()
				s.udp.refused.Add(1) // beyond the port's bound: dropped, counted
				continue
			}
			if !s.acquire() {
				mu.Unlock()
				s.udp.refused.Add(1)
				continue
			}
			if !s.addWorker() {
				mu.Unlock()
				s.release()
				return
			}
			c = &publicUDPClient{src: src, queue: make(chan []byte, o.QueueLen)}
			clients[src] = c
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer s.wg.Done()
				defer s.release()
				s.runPublicUDP(ctx, pl, c, o)
				mu.Lock()
				delete(clients, c.src)
				mu.Unlock()
			}()
		}
		mu.Unlock()
		select {
		case c.queue <- append([]byte(nil), buf[:n]...):
		default:
			s.udp.queueFull.Add(1)
		}
	}
}

// runPublicUDP opens a session to the agent for one public client and relays
// its datagrams until the session is idle for IdleTimeout, the agent ends it,
// the agent's control session ends, or the port closes.
func (s *Server) runPublicUDP(ctx context.Context, pl *reverse.PublicListener, c *publicUDPClient, o UDPOptions) {
	start := time.Now()
	agent, end, outcome := "", "", "ok"
	var st wire.UDPFlowStats
	defer func() {
		s.stats.session("udp", authz.ActionExposePublic, outcome, st.BytesOut, st.BytesIn)
		s.log.LogAttrs(context.Background(), slog.LevelInfo, "public session",
			slog.String("remote", c.src.String()), slog.String("exposure", reverse.DescribeKey(pl.Key)), slog.String("agent", agent),
			slog.Int64("bytes_up", st.BytesOut), slog.Int64("bytes_down", st.BytesIn),
			slog.Int64("datagrams_up", st.DatagramsOut), slog.Int64("datagrams_down", st.DatagramsIn),
			slog.Duration("duration", time.Since(start)), slog.String("end", end))
		s.auditPublic(start, c.src.String(), "udp", pl.Key, agent, st.BytesOut, st.BytesIn, end)
	}()
	refused := func(why string) {
		end = "refused: " + why
		t := time.NewTimer(publicUDPRetry) // the client's datagrams are dropped meanwhile
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
		}
	}
	a, label, ok := s.rev.LookupKey(pl.Key)
	var (
		actx   context.Context
		cancel context.CancelFunc
		flow   *wire.UDPFlow
	)
	if ok {
		agent = a.ID.String() + " (" + a.Transport + ")"
		actx, cancel = context.WithCancel(a.Ctx)
		defer cancel()
		defer context.AfterFunc(ctx, cancel)()
		hdr := wire.SessionHeader{V: wire.Version, Session: newSessionID(), Name: label, Public: pl.Key, PeerAddr: c.src.String(), Net: "udp"}
		var herr *wire.HelloError
		if flow, herr = a.OpenFlow(actx, hdr, o.QueueLen); herr != nil {
			outcome = herr.Code
			refused(herr.Error())
			return
		}
	} else {
		// Served by another instance, perhaps: this client's datagrams travel
		// there as capsules on a peer connection (peer_public.go).
		actx, cancel = context.WithCancel(ctx)
		defer cancel()
		defer context.AfterFunc(s.force, cancel)()
		hdr := wire.SessionHeader{V: wire.Version, Session: newSessionID(), Public: pl.Key, PeerAddr: c.src.String(), Net: "udp"}
		pc, inst, herr := s.forwardPublic(actx, pl.Key, hdr)
		if herr != nil {
			outcome = herr.Code
			refused(herr.Error())
			return
		}
		agent = "peer " + inst
		flow = wire.NewCapsuleFlow(pc, o.QueueLen)
	}
	defer flow.Close()
	// A capsule write blocked by a stalled agent ends with the session.
	defer context.AfterFunc(actx, func() { _ = flow.Close() })()
	flow.Start()
	s.udp.active.Add(1)
	s.udp.flows.Add(1)
	defer s.udp.active.Add(-1)

	var last atomic.Int64
	touch := func() { last.Store(time.Now().UnixNano()) }
	touch()
	ends := make(chan string, 1)
	go func() { // agent → public client
		for {
			d, err := flow.ReadDatagram()
			if err != nil {
				if errors.As(err, new(*wire.ProtocolError)) {
					flow.Abort(wire.QUICInternal) // a malformed REPORT (PROTOCOL 9.5)
				}
				ends <- wire.FlowEnd("agent", err)
				return
			}
			touch()
			if _, err := pl.PC.WriteToUDPAddrPort(d, c.src); err != nil {
				if errors.Is(err, net.ErrClosed) {
					ends <- "the public port closed"
					return
				}
				s.udp.queueFull.Add(1) // ENOBUFS and the like: dropped, as UDP would
			}
		}
	}()
	tick := time.NewTicker(max(o.IdleTimeout/8, 10*time.Millisecond))
	defer tick.Stop()
	for end == "" {
		select {
		case d := <-c.queue:
			touch()
			if _, err := flow.Write(d); err != nil && !errors.Is(err, wire.ErrDatagramTooLarge) {
				end = wire.FlowEnd("agent", err)
			}
		case end = <-ends:
		case <-actx.Done():
			end = "the agent's control session ended"
			if ctx.Err() != nil {
				end = "the public port closed"
			}
			// Tell the agent its session was cut, not ended (shutdown, revocation).
			wire.Abort(flow, wire.AbortCode(context.Cause(actx)))
		case <-tick.C:
			if time.Since(time.Unix(0, last.Load())) >= o.IdleTimeout {
				end = "idle for " + o.IdleTimeout.String()
			}
		}
	}
	_ = flow.Close()
	st = flow.Stats()
	s.udp.up.Add(st.DatagramsOut)
	s.udp.down.Add(st.DatagramsIn)
	s.udp.queueFull.Add(st.QueueFull)
	s.udp.oversize.Add(st.Oversize)
}
