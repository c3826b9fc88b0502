package clients

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients/direct"
	"github.com/tp-proxy/tp/proxy/wire"
)

// The agent's side of direct paths (docs/PROTOCOL.md, section 11.4.2).

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
	if udp || a.NoDirect || v[0] != direct.Version {
		_ = conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, _ = conn.Write([]byte{direct.Marker, direct.Refused})
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		_ = conn.Close()
		log.Info("tp expose: a dialer asked for a direct path; refused (the dialer goes on without)", "version", v[0], "udp", udp, "no_direct", a.NoDirect)
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	start := time.Now()
	opts := a.Dialer.iceOptions()
	p, err := direct.Accept(ctx, conn, a.inner, opts)
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
	cs := p.Conn.ConnectionState().TLS
	a.mu.Lock()
	iss, known := a.issuers[full]
	a.mu.Unlock()
	chainErr := errors.New("the agent does not know the CA of its own certificate yet")
	if known {
		chainErr = iss.is.CheckChains(cs.PeerCertificates[0], cs.VerifiedChains)
	}
	id, idErr := authz.IdentityFromCert(cs.PeerCertificates[0])
	var code, reason string
	switch {
	case !strings.EqualFold(cs.ServerName, full):
		code, reason = wire.CodeUnauthenticated, fmt.Sprintf("the end-to-end QUIC connection names %q, not %s", cs.ServerName, full)
	case chainErr != nil:
		code, reason = wire.CodeUnauthenticated, "the agent refused the device certificate: "+chainErr.Error()
	case idErr != nil:
		code, reason = wire.CodeUnauthenticated, "the device certificate carries no TP identity: "+idErr.Error()
	}
	// The pair ends with the earlier of both certificates, as a carrier does.
	expires := cs.PeerCertificates[0].NotAfter
	if known {
		expires = minTime(expires, iss.leaf.NotAfter)
	}
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

	var wg sync.WaitGroup
	var streams int
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
			(&e2eSession{Stream: s, bridge: s, capsules: s}).refuse(code, reason, slog)
			p.Close(wire.QUICNoError, "refused")
			break
		}
		pd := first
		first = nil
		wg.Add(1)
		go func() {
			defer wg.Done()
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
				slog.Warn("tp expose: a stream of a direct path without its opener; aborted", "opener", op[0], "err", err)
				return
			}
			_ = s.SetReadDeadline(time.Time{})
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			a.admit(sctx, &e2eSession{Stream: s, bridge: s, capsules: s}, hdr, full, local, false, pd, nil, id.DeviceID, id.User, time.Now(), slog)
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
	log.Info("tp expose: end-to-end QUIC pair ended", "streams", streams, "duration", time.Since(start),
		"direct_packets", st.DirectOut+st.DirectIn, "relayed_packets", st.RelayOut+st.RelayIn, "end", end)
}
