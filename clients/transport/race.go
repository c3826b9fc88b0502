package transport

// Transport auto across carriers (docs/PROTOCOL.md §9.8, client rules). With
// no carrier forced, auto connects QUIC over UDP and, when UDP has not
// answered within the carrier head start, also QUIC over the stream carriers
// in turn (tls, then ws, then http); the first handshake that completes wins
// and the other attempt is abandoned. The answer is remembered per server and
// network (TransportCache, NetworkID). TP's plain TLS transport is the last
// resort, when QUIC gets through on no carrier. A connection that won on a
// stream carrier runs on a MovingConn: it moves on when its carrier stalls,
// and it probes UDP every UDPReprobe and moves back to UDP when UDP answers.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/internal/lib/udpgro"
	"github.com/tp-proxy/tp/proxy/wire"
)

// DefaultCarrierHeadStart is how long auto gives QUIC over UDP alone before
// it also tries the stream carriers. Longer than the plain-TLS head start
// (DefaultHeadStart): a carrier that wins only because UDP was slow keeps the
// connection off UDP until the next UDP probe.
const DefaultCarrierHeadStart = 500 * time.Millisecond

// DefaultUDPReprobe is how often a connection on a stream carrier checks
// whether UDP gets through again (Client.UDPReprobe when zero).
const DefaultUDPReprobe = 2 * time.Minute

// carrierTry bounds one stream carrier's attempt (its link and the QUIC
// handshake over it) in the race and a UDP probe's handshake.
const (
	carrierTry = 10 * time.Second
	udpProbe   = 3 * time.Second
)

// racesCarriers reports whether connecting races UDP against the stream
// carriers: carrier auto, or no carrier forced with transport auto.
func (cl *Client) racesCarriers() bool {
	return cl.Carrier == CarrierAuto || cl.Carrier == "" && cl.FallbackCarriers == nil && (cl.Transport == "" || cl.Transport == Auto)
}

// streamCarriers are the carriers auto may use besides UDP, in order: those
// the server's discovery document lists, all three when there is none.
func (cl *Client) streamCarriers(ctx context.Context) []string {
	all := []string{wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP}
	if len(cl.FallbackCarriers) > 0 {
		return cl.FallbackCarriers
	}
	doc := cl.discover(ctx)
	if doc == nil {
		return all
	}
	names := map[string]string{wire.CarrierTLS: wire.DiscoverCarrierTLS, wire.CarrierWS: wire.DiscoverCarrierWS, wire.CarrierHTTP: wire.DiscoverCarrierHTTP}
	return slices.DeleteFunc(all, func(k string) bool {
		_, ok := doc.Find(names[k])
		return !ok
	})
}

// raceResult is one attempt of the race: the connection and what it runs on.
type raceResult struct {
	kind       string
	remembered bool // the carrier remembered for this network, tried first
	conn       *quic.Conn
	tr         *quic.Transport
	pc         net.PacketConn
	err        error
}

func (r raceResult) close() {
	if r.conn != nil {
		_ = r.conn.CloseWithError(wire.QUICNoError, "")
	}
	if r.tr != nil {
		_ = r.tr.Close()
	}
	if r.pc != nil {
		_ = r.pc.Close()
	}
}

// dialOverUDP is the race's UDP attempt: a plain UDP socket (quic-go keeps GSO
// and batched reads on it, coalesced: package udpgro), or a MovingConn with
// carrier auto, whose live connection may move to a stream carrier.
func (cl *Client) dialOverUDP(ctx context.Context, raddr *net.UDPAddr, cfg *tls.Config, qcfg *quic.Config) raceResult {
	udp, err := net.ListenUDP("udp", nil)
	if err != nil {
		return raceResult{kind: wire.CarrierUDP, err: fmt.Errorf("opening a UDP socket for QUIC: %w", err)}
	}
	var pc net.PacketConn
	if cl.Carrier == CarrierAuto {
		pc = NewMovingConn(udp, raddr)
	} else {
		pc = udpgro.Wrap(udp)
	}
	r := raceResult{kind: wire.CarrierUDP, tr: &quic.Transport{Conn: pc}, pc: pc}
	if r.conn, r.err = r.tr.Dial(ctx, raddr, cfg, configFor(r.pc, qcfg)); r.err != nil {
		r.close()
		r.err = fmt.Errorf("over udp: %w", r.err)
	}
	return r
}

// dialOverCarrier is one stream carrier's attempt, on a MovingConn moved to it
// (so that the connection can move on, or back to UDP, later).
func (cl *Client) dialOverCarrier(ctx context.Context, kind string, raddr *net.UDPAddr, cfg *tls.Config, qcfg *quic.Config) raceResult {
	ctx, cancel := context.WithTimeout(ctx, carrierTry)
	defer cancel()
	r := raceResult{kind: kind}
	dial, err := cl.carrierDialer(kind)
	if err != nil {
		r.err = err
		return r
	}
	cc, err := NewCarrierConn(ctx, kind, cl.Server, dial)
	if err != nil {
		r.err = fmt.Errorf("over %s: %w", kind, err)
		return r
	}
	udp, err := net.ListenUDP("udp", nil)
	if err != nil {
		_ = cc.Close()
		r.err = fmt.Errorf("opening a UDP socket for QUIC: %w", err)
		return r
	}
	mc := NewMovingConn(udp, raddr)
	mc.MoveTo(cc)
	r.pc, r.tr = mc, &quic.Transport{Conn: mc}
	// A server that closes the carrier connection before answering anything
	// serves no QUIC behind it: give up on this carrier at once.
	go func() {
		select {
		case <-cc.Refused():
			cancel()
		case <-ctx.Done():
		}
	}()
	if r.conn, r.err = r.tr.Dial(ctx, raddr, cfg, configFor(r.pc, qcfg)); r.err != nil {
		select {
		case <-cc.Refused():
			r.err = fmt.Errorf("the server closed the %s carrier connection without answering (it serves no QUIC): %w", kind, r.err)
		default:
		}
		r.close()
		r.err = fmt.Errorf("over %s: %w", kind, r.err)
	}
	return r
}

// raceCarriers connects QUIC for the shared connection: over the carrier
// remembered for this server and network when there is one, otherwise UDP
// first and, after the carrier head start or as soon as UDP fails, each stream
// carrier in turn; the first handshake to complete wins.
func (cl *Client) raceCarriers(ctx context.Context, cfg *tls.Config, qcfg *quic.Config) (raceResult, error) {
	raddr, err := resolveUDP(ctx, cl.quicAddr())
	if err != nil {
		return raceResult{}, err
	}
	carriers := cl.streamCarriers(ctx)
	var errs []error
	if kind := cl.cachedCarrier(); kind != "" && kind != wire.CarrierUDP && slices.Contains(carriers, kind) {
		// Remembered on this network: no UDP wait (the connection probes UDP later).
		r := cl.dialOverCarrier(ctx, kind, raddr, cfg, qcfg)
		if r.err == nil || ctx.Err() != nil {
			r.remembered = true
			return r, r.err
		}
		errs = append(errs, fmt.Errorf("(remembered) %w", r.err))
		carriers = slices.DeleteFunc(slices.Clone(carriers), func(k string) bool { return k == kind })
	}
	start := time.Now()
	uctx, ucancel := context.WithCancel(ctx)
	defer ucancel()
	cctx, ccancel := context.WithCancel(ctx)
	defer ccancel()
	results := make(chan raceResult, 2)
	go func() { results <- cl.dialOverUDP(uctx, raddr, cfg, qcfg) }()
	startCarriers := func() {
		go func() {
			var cerrs []error
			for _, kind := range carriers {
				r := cl.dialOverCarrier(cctx, kind, raddr, cfg, qcfg)
				if r.err == nil {
					results <- r
					return
				}
				cerrs = append(cerrs, r.err)
				if cctx.Err() != nil {
					break
				}
			}
			if len(cerrs) == 0 {
				cerrs = append(cerrs, errors.New("the server offers no stream carrier"))
			}
			results <- raceResult{kind: "carriers", err: errors.Join(cerrs...)}
		}()
	}
	head := cl.CarrierHeadStart
	if head <= 0 {
		head = DefaultCarrierHeadStart
		if cl.cachedCarrier() == wire.CarrierUDP {
			// UDP worked on this network: a slow handshake is more likely a
			// loaded host or path than a block.
			head = DefaultCarrierUDPTry
		}
	}
	headTimer := time.NewTimer(head)
	defer headTimer.Stop()
	var udpDeadline <-chan time.Time
	pending, carriersStarted := 1, false
	for pending > 0 {
		select {
		case <-headTimer.C:
			if !carriersStarted {
				carriersStarted, pending = true, pending+1
				startCarriers()
			}
		case <-udpDeadline:
			ucancel() // the carriers all failed and UDP had its try: give up on it
			udpDeadline = nil
		case r := <-results:
			pending--
			if r.err == nil {
				ucancel()
				ccancel()
				go func(n int) { // a late winner is closed
					for range n {
						if late := <-results; late.err == nil {
							late.close()
						}
					}
				}(pending)
				return r, nil
			}
			errs = append(errs, r.err)
			if ctx.Err() != nil {
				continue
			}
			if r.kind == wire.CarrierUDP && !carriersStarted {
				carriersStarted, pending = true, pending+1
				startCarriers()
			}
			if r.kind == "carriers" && pending > 0 {
				// With carrier auto, UDP is all that is left: it gets its try.
				// Otherwise TP's plain TLS transport comes next, at once (a
				// server that refused every carrier likely has no QUIC).
				wait := time.Duration(0)
				if cl.Carrier == CarrierAuto {
					wait = max(0, DefaultCarrierUDPTry-time.Since(start))
				}
				udpDeadline = time.After(wait)
			}
		}
	}
	return raceResult{}, errors.Join(errs...)
}

// installRaced makes the race's winner the Client's packet conn and transport,
// closing the ones of a connection that died (and its further connections).
func (cl *Client) installRaced(r raceResult) {
	q := &cl.quic
	q.mu.Lock()
	oldTr, oldPC := q.tr, q.udp
	q.closeExtrasLocked()
	q.tr, q.udp = r.tr, r.pc
	q.moves = nil
	if r.kind != wire.CarrierUDP {
		q.moves = []carrierSwitch{{kind: r.kind}}
	}
	q.mu.Unlock()
	if oldTr != nil {
		_ = oldTr.Close()
		_ = oldPC.Close()
	}
	cl.reportRaced(r)
}

// reportRaced says where the race's winner r connected, and remembers its
// carrier for this server and network.
func (cl *Client) reportRaced(r raceResult) {
	switch {
	case r.remembered:
		cl.logf("tp: connected over the %s carrier, remembered for this network (UDP is tried again every %s)", r.kind, cl.udpReprobe())
	case r.kind != wire.CarrierUDP:
		cl.logf("tp: no answer over UDP in time; connected over the %s carrier", r.kind)
	}
	cl.rememberCarrier(r.kind)
}

// probeUDP reports whether a QUIC handshake with the server over UDP, from a
// socket of its own, completes within udpProbe. The probe's connection is
// closed at once.
func (cl *Client) probeUDP(ctx context.Context, raddr net.Addr) bool {
	cfg, err := cl.tlsConfig()
	if err != nil {
		return false
	}
	udp, err := net.ListenUDP("udp", nil)
	if err != nil {
		return false
	}
	defer udp.Close()
	tr := &quic.Transport{Conn: udp}
	defer tr.Close()
	ctx, cancel := context.WithTimeout(ctx, udpProbe)
	defer cancel()
	conn, err := tr.Dial(ctx, raddr, cfg, &quic.Config{HandshakeIdleTimeout: udpProbe, MaxIncomingStreams: -1, MaxIncomingUniStreams: -1})
	if err != nil {
		return false
	}
	_ = conn.CloseWithError(wire.QUICNoError, "UDP probe")
	return true
}

func (cl *Client) udpReprobe() time.Duration {
	if cl.UDPReprobe > 0 {
		return cl.UDPReprobe
	}
	return DefaultUDPReprobe
}

// moveToUDP moves the connection on mc back to its UDP socket.
func (cl *Client) moveToUDP(mc *MovingConn) error {
	if mc == nil || mc.Current() == nil {
		return errors.New("the connection is not on a stream carrier")
	}
	mc.MoveBack()
	cl.noteMove(mc, wire.CarrierUDP)
	return nil
}
