package clients

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/clients/direct"
	"github.com/tp-proxy/tp/proxy/wire"
)

// The agent's side of direct paths (docs/PROTOCOL.md, section 11.4.2).

// directAgentIdle is how long a pair without sessions stays up on the agent.
const directAgentIdle = 2 * time.Minute

// A pair costs the agent more than a session (an ICE agent, a UDP socket, a
// QUIC connection): it serves at most maxPairsPerDevice of them to one dialer
// device and maxPairs in all, and refuses more as it refuses a UDP name's (the
// dialer's session goes on through the TP server).
const (
	maxPairsPerDevice = 16
	maxPairs          = 256
)

// directPairs counts the pairs an agent serves, per dialer device.
type directPairs struct {
	mu       sync.Mutex
	byDevice map[string]int
	total    int
	perCap   int // maxPairsPerDevice when zero (tests lower it)
}

// claim takes a place for a pair with device; false (and why) when it has
// none left. release gives it back.
func (d *directPairs) claim(device string) (bool, string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	per := d.perCap
	if per <= 0 {
		per = maxPairsPerDevice
	}
	switch {
	case d.byDevice[device] >= per:
		return false, fmt.Sprintf("its device already holds %d direct-path pairs with this agent", per)
	case d.total >= maxPairs:
		return false, fmt.Sprintf("this agent already serves %d direct-path pairs", maxPairs)
	}
	if d.byDevice == nil {
		d.byDevice = map[string]int{}
	}
	d.byDevice[device]++
	d.total++
	return true, ""
}

func (d *directPairs) release(device string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.byDevice[device]--; d.byDevice[device] <= 0 {
		delete(d.byDevice, device)
	}
	d.total--
}

// serveDirect serves a protected session whose first byte was direct.Marker:
// the dialer opens an end-to-end QUIC pair over it. The agent answers, takes
// the QUIC handshake (its certificate for the name, the dialer's device
// certificate required), holds the dialer's certificate to the same rules as
// in an inner TLS session, and serves each stream the dialer opens as a
// session of its own, checked against the allow list as it is then.
func (a *Agent) serveDirect(ctx context.Context, conn net.Conn, hdr wire.SessionHeader, full, local string, udp bool, pre *localDial, answered func(), log *slog.Logger) {
	var v [1]byte
	if _, err := io.ReadFull(conn, v[:]); err != nil {
		refuseSession(conn, wire.QUICInternal)
		log.Warn("tp expose: a direct path's opening was cut", "err", err.Error())
		return
	}
	why := ""
	switch {
	case udp:
		why = "the name is a UDP service"
	case a.NoDirect:
		why = "this agent runs with --no-direct"
	case v[0] != direct.Version:
		why = fmt.Sprintf("version %d, this agent speaks %d", v[0], direct.Version)
	default:
		var ok bool
		if ok, why = a.pairs.claim(hdr.PeerID); ok {
			defer a.pairs.release(hdr.PeerID)
		}
	}
	if why != "" {
		_ = conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, _ = conn.Write([]byte{direct.Marker, direct.Refused})
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		_ = conn.Close()
		log.Info("tp expose: a dialer asked for a direct path; refused (the dialer goes on without)", "why", why)
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	start := time.Now()
	opts := a.Dialer.iceOptions()
	p, err := direct.Accept(ctx, conn, a.inner)
	if err != nil {
		log.Warn("tp expose: a direct path's QUIC handshake failed", "err", err.Error())
		return
	}
	answered()
	log = log.With("e2e", "direct")
	p.Path.OnSwitch(func(on bool) {
		if on {
			log.Info("tp expose: the session with the dialer moved to a direct path")
		} else {
			log.Info("tp expose: the session with the dialer is relayed by the TP server again")
		}
	})
	id, code, reason, expires := a.checkDialer(p.Conn.ConnectionState().TLS, full, "the end-to-end QUIC connection")
	if code == "" && id.DeviceID == hdr.PeerID && a.allowed(id.User, hdr) {
		// Only a dialer that passed the checks learns this device's addresses.
		p.StartICE(false, opts)
	}
	// The pair ends with the earlier of both certificates, as a carrier does.
	now := time.Now
	if a.inner.Time != nil {
		now = a.inner.Time
	}
	expiry := time.AfterFunc(expires.Sub(now()), func() {
		p.Close(wire.QUICCertExpired, "a certificate of the end-to-end QUIC connection expired")
	})
	defer expiry.Stop()
	stop := context.AfterFunc(ctx, func() { p.Close(wire.QUICShutdown, "the agent stops") })
	defer stop()

	var (
		wg      sync.WaitGroup
		streams int
		open    atomic.Int64
		lastEnd atomic.Int64
		aborts  abortWatch // past its bound the pair ends
	)
	lastEnd.Store(time.Now().UnixNano())
	floodEnd := func() {
		log.Warn("tp expose: end-to-end QUIC pair ended: its dialer aborted more sessions before their answer than it let be answered (rapid reset)",
			"aborted", aborts.aborted.Load(), "answered", aborts.answered.Load())
		p.Close(wire.QUICRefused, "more sessions aborted before their answer than answered")
	}
	go func() { // a pair without sessions ends after directAgentIdle, as a carrier does
		tick := time.NewTicker(directAgentIdle / 8)
		defer tick.Stop()
		for {
			select {
			case <-p.Done():
				return
			case <-tick.C:
				if open.Load() == 0 && time.Since(time.Unix(0, lastEnd.Load())) > directAgentIdle {
					p.Close(wire.QUICNoError, "no session for "+directAgentIdle.String())
				}
			}
		}
	}()
	first := pre
	for {
		str, err := p.Conn.AcceptStream(context.Background())
		if err != nil {
			break
		}
		streams++
		s := wire.NewQUICStream(p.Conn, str)
		slog := log.With("stream", str.StreamID())
		if code != "" {
			// The refusal is the answer to the first stream; the connection
			// ends once the dialer read it (or after 5 s), with the reason too.
			(&e2eSession{Stream: s, bridge: s, capsules: s}).refuse(code, reason, slog)
			select {
			case <-p.Conn.Context().Done():
			case <-time.After(5 * time.Second):
			}
			p.Close(wire.QUICRefused, reason)
			break
		}
		pd := first
		first = nil
		open.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { lastEnd.Store(time.Now().UnixNano()); open.Add(-1) }()
			defer pd.discard()
			defer a.muxStreams.Add(-1)
			if n := a.muxStreams.Add(1); n > a.maxSessions() {
				(&e2eSession{Stream: s, bridge: s, capsules: s}).refuse(wire.CodeReverseBusy,
					fmt.Sprintf("the agent of %s serves as many sessions as it takes (%d)", full, a.maxSessions()), slog)
				return
			}
			var op [1]byte
			_ = s.SetReadDeadline(time.Now().Add(agentHandshakeTimeout))
			if _, err := io.ReadFull(s, op[:]); err != nil || op[0] != direct.StreamOpener {
				wire.Abort(s, wire.QUICInternal)
				if _, reset := wire.StreamResetCode(err); reset {
					// The dialer reset the stream before its first byte: an
					// abort before the answer, counted as the others are.
					if aborts.abort() {
						floodEnd()
					}
					return
				}
				slog.Warn("tp expose: a stream of a direct path without its opener; aborted", "opener", op[0], "err", err)
				return
			}
			_ = s.SetReadDeadline(time.Time{})
			// The set-up (the dial of the local service) ends when the dialer
			// aborts the stream before its answer, as on a carrier.
			sess := &e2eSession{Stream: s, bridge: s, capsules: s}
			if aborts.admit(ctx, str.Context(), sess, func(sctx context.Context) {
				a.admit(sctx, sess, hdr, full, local, false, pd, nil, id.DeviceID, id.User, time.Now(), slog)
			}) {
				floodEnd()
			}
		}()
	}
	first.discard()
	<-p.Done()
	wg.Wait()
	end := "closed"
	if err := context.Cause(p.Conn.Context()); err != nil {
		end = err.Error()
	}
	st := p.Path.Stats()
	attrs := []any{"streams", streams, "duration", time.Since(start),
		"direct_packets", st.DirectOut + st.DirectIn, "relayed_packets", st.RelayOut + st.RelayIn,
		"large_direct", st.LargeDirect, "large_on_relay", st.LargeOnRelay, "end", end}
	if err := p.ICEErr(); err != nil {
		attrs = append(attrs, "no_direct_path", err.Error())
	}
	log.Info("tp expose: end-to-end QUIC pair ended", attrs...)
}
