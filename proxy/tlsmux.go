package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// tp-mux/1 (docs/PROTOCOL.md, section 9.9): a TLS connection whose client
// offered ALPN "tp-mux/1" carries many TP sessions, each a stream of the
// multiplexer (proxy/mux) served exactly as a QUIC stream is: a hello, an
// answer, bytes, its own policy decision, live re-checks, audit record and
// slot of the identity's sessions. The connection costs one handshake for
// all of them.

// Server-side timers of a tp-mux connection (nanoseconds); variables so that
// tests can shorten them.
var (
	// tlsMuxTick is how often a connection checks its timers.
	tlsMuxTick = newDuration(wire.MuxPing)
	// tlsMuxDead: a connection from which nothing arrived for this long (the
	// client pings every wire.MuxPing) is cut.
	tlsMuxDead = newDuration(wire.MuxDead)
	// tlsMuxIdle: a connection without streams for this long is closed (the
	// client closes its own after a minute).
	tlsMuxIdle = newDuration(2 * time.Minute)
)

func newDuration(d time.Duration) *atomic.Int64 {
	var v atomic.Int64
	v.Store(int64(d))
	return &v
}

// tlsMuxGrowBudget bounds the window growth of one connection's streams (see
// mux.Options): with wire.MuxMaxStreams streams at wire.MuxStreamWindow it
// bounds what one client can make tpd buffer to about 160 MiB, and the
// identity's session limit bounds it further.
const tlsMuxGrowBudget = 32 << 20

// tlsMuxOptions are the server's bounds of a tp-mux connection.
func tlsMuxOptions(notAfter time.Time) mux.Options {
	return mux.Options{Label: "tp-mux connection", Noun: "connection", StreamLabel: "tp-mux stream", Peer: "client",
		Expires: notAfter, ExpiredReason: "the client certificate expired",
		MaxStreams: wire.MuxMaxStreams, MaxPayload: wire.MuxMaxPayload, SendPayload: wire.MuxMaxPayload,
		StreamWindow: wire.MuxStreamWindow, MaxStreamWindow: wire.MuxMaxStreamWindow, GrowBudget: tlsMuxGrowBudget,
		Tick: time.Duration(tlsMuxTick.Load()), Dead: time.Duration(tlsMuxDead.Load()), ServerIdle: time.Duration(tlsMuxIdle.Load()),
		AbortCodes: true, WriteFrames: writeGathered}
}

// writeGathered writes a batch of frames to a tp-mux connection with as few
// system calls as its TLS records allow (wire.EOFConn.Batch), as TP's client
// does (clients/tlsmux.go); without it a 64 KiB download chunk costs five.
func writeGathered(c net.Conn, b []byte) error {
	if tc, ok := c.(*tls.Conn); ok {
		for below := tc.NetConn(); below != nil; {
			if e, ok := below.(*wire.EOFConn); ok {
				return e.Batch(func() error { _, err := c.Write(b); return err })
			}
			u, ok := below.(interface{ Unwrap() net.Conn })
			if !ok {
				break
			}
			below = u.Unwrap()
		}
	}
	_, err := c.Write(b)
	return err
}

// muxForceWait bounds how long a forced shutdown waits for a tp-mux
// connection's sessions to abort their streams with the shutdown code before
// it cuts the connection under them.
const muxForceWait = 2 * time.Second

// serveMux serves a tp-mux/1 connection until it ends: every stream the
// client opens is a session (serveStream, transport "tls"). Drain (Shutdown)
// sends GOAWAY: streams opened after it are refused, open ones finish, and
// the connection closes with its last. A forced shutdown cuts the streams
// with reason shutdown; the certificate's expiry ends the connection.
func (s *Server) serveMux(ctx context.Context, conn *tls.Conn) {
	start := time.Now()
	cs := connectionState(conn)
	remote := conn.RemoteAddr().String()
	identity, notAfter := s.connIdentity(cs)
	// Sessions end through sctx, cancelled with wire.ErrShutdown only when the
	// server gives up draining (ctx), so that each records why it ended.
	sctx, scancel := context.WithCancelCause(context.WithoutCancel(ctx))
	defer scancel(nil)

	var (
		streams          sync.WaitGroup
		live             atomic.Int64             // sessions of streams not yet ended
		ended            = make(chan struct{}, 1) // a session ended
		served, refused  atomic.Int64
		draining         = s.draining
		refuse           = func(st *mux.Stream) { refused.Add(1); go st.AbortWith(mux.AbortRefused) }
		refuseOverloaded atomic.Bool
		conns            atomic.Pointer[mux.Conn] // m, for the flood's trip
	)
	flood := newCancelFlood(func() {
		s.log.Warn("tp-mux connection takes no more streams (GOAWAY): its client cancelled more requests before their answer than it let be answered (rapid reset)",
			"remote", remote, "identity", identity)
		if m := conns.Load(); m != nil {
			m.Drain()
		}
	})
	accept := func(st *mux.Stream) { // on the connection's reader: it must not wait
		if draining.Err() != nil || !time.Now().Before(notAfter) || flood.Tripped() {
			refuse(st) // nothing reached a destination: the client may open it elsewhere
			return
		}
		if !s.acquire() {
			refuse(st)
			if refuseOverloaded.CompareAndSwap(false, true) {
				s.log.Warn("tp-mux stream refused: too many connections", "remote", remote, "max_conns", s.lim().MaxConns)
			}
			return
		}
		served.Add(1)
		streams.Add(1)
		live.Add(1)
		go func() {
			defer streams.Done()
			defer s.release()
			defer func() {
				live.Add(-1)
				select {
				case ended <- struct{}{}:
				default:
				}
			}()
			s.serveStreamOf(sctx, st, cs, "tls", flood)
		}()
	}
	m := mux.New(conn, tlsMuxOptions(notAfter), accept)
	conns.Store(m)
	stopForce := context.AfterFunc(ctx, func() {
		// Each session aborts its stream with the shutdown code (and records
		// why); the connection ends once their ABORTs are written, so that the
		// client reads the code, not the connection's end (bounded by
		// muxForceWait, then the rest are cut with the connection).
		scancel(wire.ErrShutdown)
		wait := time.NewTimer(muxForceWait)
		defer wait.Stop()
		for live.Load() > 0 {
			select {
			case <-ended:
			case <-wait.C:
				m.Fail(wire.ErrShutdown)
				return
			}
		}
		m.Close() // no stream left: close_notify (Close cuts any that opened since)
	})
	defer stopForce()
	stopDrain := context.AfterFunc(draining, m.Drain)
	defer stopDrain()

	<-m.Done()
	// The connection is gone: nothing reaches the client any more. A session
	// blocked on a destination that neither reads nor writes would never touch
	// its stream again and outlive the client; its end now says why (a
	// shutdown's cut set its own cause first).
	scancel(wire.ErrClientGone)
	streams.Wait()
	// A connection this end closed lingers until the client's close (bounded):
	// tpd's exit must not cut it short and reset the client's last data.
	<-m.Closed()
	end := "closed"
	if err := m.Err(); err != nil {
		end = err.Error()
	}
	var pe *wire.ProtocolError
	level := slog.LevelInfo
	if errors.As(m.Err(), &pe) {
		level = slog.LevelWarn
	}
	s.log.LogAttrs(ctx, level, "tp-mux connection ended", slog.String("identity", identity), slog.String("remote", remote),
		slog.Int64("streams", served.Load()), slog.Int64("refused", refused.Load()),
		slog.Duration("duration", time.Since(start)), slog.String("end", end))
}

// connIdentity names the client of a connection for its log lines, and says
// when its right to the connection ends: the leaf's expiry, or the identity's
// if that is earlier. A connection without a certificate has neither.
func (s *Server) connIdentity(cs *tls.ConnectionState) (identity string, notAfter time.Time) {
	if len(cs.PeerCertificates) == 0 {
		return "", time.Time{}
	}
	leaf := cs.PeerCertificates[0]
	identity, notAfter = leaf.Subject.CommonName, leaf.NotAfter
	if id, err := s.cfg.Identify(*cs); err == nil {
		identity = id.String()
		if !id.NotAfter.IsZero() && id.NotAfter.Before(notAfter) {
			notAfter = id.NotAfter
		}
	}
	return identity, notAfter
}
