package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/internal/lib/udpgro"
	"github.com/tp-proxy/tp/proxy/carrier"
	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// QUICOptions bounds QUIC connections. Zero values take the defaults.
type QUICOptions struct {
	// MaxStreams is the number of concurrent requests (bidirectional streams) one
	// connection may have open; the peer cannot open more on it until one ends
	// (TP's client then opens a further connection). Default DefaultQUICMaxStreams.
	MaxStreams int64
	// KeepAlive is the period of keepalive packets on an idle connection, which keep
	// NAT bindings open. Default 15s. Negative disables.
	KeepAlive time.Duration
	// IdleTimeout ends a connection that received nothing for this long (the
	// smaller of both sides' values applies). Default 60s.
	IdleTimeout time.Duration
	// StatelessResetKey, when set, lets the server tell clients of a connection it
	// no longer knows (after a restart) at once instead of at their idle timeout.
	// It must stay the same across restarts and be secret.
	StatelessResetKey *quic.StatelessResetKey
	// LB, when set, makes the connection IDs carry this instance's server ID for a
	// load balancer (quiclb.go). Nil keeps quic-go's random 4-octet IDs.
	LB *QUICLB
	// Carriers bounds the stream carriers (package proxy/carrier), which feed
	// this QUIC server when pc is a *net.UDPConn.
	Carriers CarrierOptions
}

// DefaultQUICMaxStreams is QUICOptions.MaxStreams when not set. It is not a
// bound per device: a device may open several connections, each stream takes a
// slot of Config.MaxConns and, after its hello, one of the device's
// MaxSessionsPerIdentity, which bound what a device holds. It is above
// DefaultMaxSessionsPerIdentity, so that a device at its bound needs one
// connection (one handshake, one MaxConns slot and one connection receive
// window) rather than six. Memory does not grow with it: quic-go keeps state only
// for streams that are open, and the connection window bounds what is buffered.
const DefaultQUICMaxStreams = 1000

func (o QUICOptions) withDefaults() (QUICOptions, error) {
	var errs []error
	if o.MaxStreams < 0 {
		errs = append(errs, errors.New("QUIC MaxStreams must not be negative"))
	}
	if o.IdleTimeout < 0 {
		errs = append(errs, errors.New("QUIC IdleTimeout must not be negative"))
	}
	if o.LB != nil {
		lb, err := o.LB.withDefaults()
		errs = append(errs, err)
		o.LB = &lb
	}
	if err := errors.Join(errs...); err != nil {
		return o, err
	}
	if o.MaxStreams == 0 {
		o.MaxStreams = DefaultQUICMaxStreams
	}
	if o.KeepAlive == 0 {
		o.KeepAlive = 15 * time.Second
	}
	if o.KeepAlive < 0 {
		o.KeepAlive = 0
	}
	if o.IdleTimeout == 0 {
		o.IdleTimeout = 60 * time.Second
	}
	return o, nil
}

// quicListener registers a QUIC listener with the server so that Shutdown stops
// it like the TCP listeners. Only Close and Addr are used. Close only ends the
// accept loop: the listener stays open through the drain so that a new QUIC
// connection is refused at once (CONNECTION_REFUSED, from GetConfigForClient)
// rather than dropped unanswered until the client's handshake times out, which
// is what a closed listener does; ServeQUIC closes it after its connections ended.
type quicListener struct {
	*quic.Listener
	stopAccepting context.CancelFunc
}

func (l *quicListener) Close() error {
	l.stopAccepting()
	return nil
}

// errQUICDraining refuses a new QUIC connection during a shutdown.
var errQUICDraining = errors.New("proxy: shutting down")

func (quicListener) Accept() (net.Conn, error) {
	return nil, errors.New("proxy: a QUIC listener has no net.Conn to accept")
}

// ServeQUIC serves the proxy over QUIC on pc (UDP, normally the same port as the
// TCP listener) until ctx ends or Shutdown is called. The caller opens pc and
// should pass a *net.UDPConn: quic-go then uses GSO, batched reads, ECN and path
// MTU discovery, which a wrapped PacketConn loses. ServeQUIC closes pc when it
// returns, after every connection it accepted has ended.
//
// The handshake is TLS 1.3 with ALPN "tp/1" and the verified client certificate of
// Config.ProxyTLS (including VerifyConnection); nothing is accepted on 0-RTT data.
// Each bidirectional stream is one request, served by ServeStream with transport
// "quic". A QUIC connection and each of its streams count against MaxConns.
func (s *Server) ServeQUIC(ctx context.Context, pc net.PacketConn, opts QUICOptions) error {
	defer pc.Close()
	opts, err := opts.withDefaults()
	if err != nil {
		return fmt.Errorf("proxy: invalid QUIC options: %w", err)
	}
	// On a UDP socket, the QUIC transport reads through the carrier mux: the
	// socket's datagrams plus the packets of the stream carriers
	// (package proxy/carrier).
	// Carriers feed the first QUIC server only; a second ServeQUIC (another
	// socket) serves UDP alone.
	var stunInMux bool
	if udp, ok := pc.(*net.UDPConn); ok {
		// The socket is read in coalesced bursts where the kernel joins
		// them (UDP GRO: package udpgro).
		rd := udpgro.NewReader(udp)
		if m := carrier.NewMux(udp, rd, opts.Carriers, s.log); s.carriers.CompareAndSwap(nil, m) {
			s.socket.Store(rd)
			defer s.socket.CompareAndSwap(rd, nil)
			defer s.carriers.CompareAndSwap(m, nil)
			defer m.Close()
			// STUN is answered in the mux, from the address each request
			// reached (stun.go).
			var lim stunLimiter
			m.SetNonQUIC(func(b []byte, from *net.UDPAddr) []byte { return s.stunAnswer(b, from, &lim, time.Now()) })
			stunInMux = true
			pc = m
		} else {
			pc = udpgro.NewConn(udp, rd) // coalesced reads, as through the mux
		}
	}
	tr := &quic.Transport{Conn: pc, StatelessResetKey: opts.StatelessResetKey}
	if opts.LB != nil {
		tr.ConnectionIDGenerator = quicLBGenerator{*opts.LB} // checked by withDefaults
	}
	defer tr.Close()
	// quic-go aborts a handshake after twice HandshakeIdleTimeout, so half of the
	// configured bound keeps the whole handshake within HandshakeTimeout.
	qcfg := &quic.Config{
		HandshakeIdleTimeout:           s.lim().HandshakeTimeout / 2,
		MaxIdleTimeout:                 opts.IdleTimeout,
		KeepAlivePeriod:                opts.KeepAlive,
		MaxIncomingStreams:             opts.MaxStreams,
		MaxIncomingUniStreams:          -1, // tp/1 uses no unidirectional streams (h3 needs a few: below)
		InitialStreamReceiveWindow:     wire.QUICInitialStreamWindow,
		MaxStreamReceiveWindow:         wire.QUICMaxStreamWindow,
		InitialConnectionReceiveWindow: wire.QUICInitialConnWindow,
		MaxConnectionReceiveWindow:     wire.QUICMaxConnWindow,
		Allow0RTT:                      false,
		EnableDatagrams:                true, // UDP flows (wire/udpflow.go)
		// tp/1 connections return stream credit in batches (streamCredit);
		// HTTP/3 returns its own as each stream starts.
		RequireStreamCreditRelease: true,
		Tracer:                     s.quicTracer,
	}
	if s.web != nil || s.connect != nil { // HTTP/3 on the same listener: its control and QPACK streams
		qcfg.MaxIncomingUniStreams = 8
	}
	if s.wt != nil { // WebTransport requires RESET_STREAM_AT (webtransport.go)
		qcfg.EnableStreamResetPartialDelivery = true
	}
	if s.web != nil {
		s.web.quic.Store(true)
		defer s.web.quic.Store(false)
	}
	qcfg.GetConfigForClient = func(*quic.ClientInfo) (*quic.Config, error) {
		if s.isClosed() {
			return nil, errQUICDraining // CONNECTION_REFUSED at once
		}
		c := qcfg.Clone()
		c.HandshakeIdleTimeout = s.lim().HandshakeTimeout / 2 // SetLimits may have changed it
		return c, nil
	}
	ln, err := tr.Listen(s.quicTLS, qcfg) // "tp/1" → proxy, "h3" → website (demux.go)
	if err != nil {
		return fmt.Errorf("proxy: QUIC listen on %s: %w", pc.LocalAddr(), err)
	}
	// STUN Binding requests on the same socket (stun.go), until ServeQUIC
	// returns: in the mux, or else as quic-go's non-QUIC packets.
	if !stunInMux {
		stunCtx, stopSTUN := context.WithCancel(context.WithoutCancel(ctx))
		stunDone := make(chan struct{})
		go func() { defer close(stunDone); s.serveSTUN(stunCtx, tr) }()
		defer func() { stopSTUN(); <-stunDone }()
	}
	actx, stopAccepting := context.WithCancel(ctx)
	defer stopAccepting()
	qln := &quicListener{ln, stopAccepting}
	if !s.track(qln) {
		_ = ln.Close()
		return ErrServerClosed
	}
	defer s.untrack(qln)
	// After the accept loop, connections whose handshake was already under way
	// are closed with QUICShutdown as they complete; the listener itself closes
	// once the connections it served have ended (deferred before conns.Wait, so
	// it runs after it).
	refusing := make(chan struct{})
	defer func() {
		_ = ln.Close()
		<-refusing
	}()
	// In a shutdown, the listener refuses new connections for as long as the
	// server drains, not only while its own connections last: a drain with no
	// QUIC connection (its sessions are all over TLS) would otherwise close
	// the socket at once, and a new QUIC client would wait out its handshake
	// timeout instead of being refused. Runs after conns.Wait, below.
	defer func() {
		if s.isClosed() {
			s.log.Debug("QUIC: every connection ended; new ones are refused until the drain ends", "udp", pc.LocalAddr().String())
			select {
			case <-s.stopped.Done():
			case <-ctx.Done():
			}
		}
	}()

	// drain ends when the listener stops: connections then refuse new streams,
	// finish the ones they have, and close. Cancelling ctx ends them at once.
	drain, stopDrain := context.WithCancel(ctx)
	defer stopDrain()
	var conns sync.WaitGroup
	defer conns.Wait()
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()

	for {
		conn, err := ln.Accept(actx)
		if err != nil {
			stopDrain()
			go func() {
				defer close(refusing)
				for {
					c, err := ln.Accept(context.Background())
					if err != nil {
						return
					}
					_ = c.CloseWithError(wire.QUICShutdown, "server shutting down")
				}
			}()
			if s.isClosed() {
				return ErrServerClosed
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("proxy: QUIC accept: %w", err)
		}
		if !s.acquire() {
			_ = conn.CloseWithError(wire.QUICRefused, "server busy: too many connections")
			s.log.Warn("QUIC connection refused: too many connections", "remote", conn.RemoteAddr().String(), "max_conns", s.lim().MaxConns)
			continue
		}
		if !s.addWorker() {
			s.release()
			_ = conn.CloseWithError(wire.QUICShutdown, "server shutting down")
			continue
		}
		conns.Add(1)
		h3 := conn.ConnectionState().TLS.NegotiatedProtocol == http3.NextProtoH3
		if h3 && s.connect != nil && s.isProxyName(conn.ConnectionState().TLS.ServerName) {
			// The proxy's HTTP/3 (CONNECT): the connection keeps its MaxConns slot.
			go func() {
				defer conns.Done()
				defer s.wg.Done()
				defer s.release()
				s.serveH3Proxy(ctx, conn, s.connect.h3, "http/3 proxy")
			}()
			continue
		}
		if h3 && !s.toWeb(conn.RemoteAddr().String()) {
			s.stats.session("quic", "web", "refused", 0, 0)
			_ = conn.CloseWithError(wire.QUICRefused, "server busy: too many website connections")
			conns.Done()
			s.wg.Done()
			continue
		}
		go func() {
			defer conns.Done()
			defer s.wg.Done()
			if h3 {
				s.stats.session("quic", "web", "ok", 0, 0)
				defer s.releaseWeb()
				if s.wt != nil {
					s.serveWebH3(ctx, conn)
					return
				}
				s.serveH3(ctx, conn, s.web.h3.Server, "http/3")
				return
			}
			defer s.release()
			s.stats.proxyConns[1].Add(1)
			if conn.ConnectionState().TLS.DidResume {
				s.stats.resumedConns[1].Add(1)
			}
			s.serveQUICConn(ctx, drain, conn, opts.MaxStreams)
		}()
	}
}

// acquire takes one MaxConns slot.
func (s *Server) acquire() bool {
	if s.active.Add(1) > int64(s.lim().MaxConns) {
		s.active.Add(-1)
		return false
	}
	return true
}

// addWorker counts a goroutine that Shutdown waits for; false once Shutdown began.
func (s *Server) addWorker() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}

// serveQUICConn accepts the streams of one connection until the peer closes it, the
// client certificate expires, or drain ends; then it waits for its streams and
// closes the connection with a code that says why. maxStreams is the connection's
// bound on concurrent streams (QUICOptions.MaxStreams), whose credit returns to
// the client in batches (streamCredit).
func (s *Server) serveQUICConn(ctx, drain context.Context, conn *quic.Conn, maxStreams int64) {
	start := time.Now()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopForce := context.AfterFunc(s.force, cancel)
	defer stopForce()
	// Streams end through sctx, which ends only after the connection was closed
	// with QUICShutdown: clients then see the connection break with that code
	// instead of an ordinary end of stream (FIN) that would hide the cut.
	// Streams are aborted with QUICShutdown first, so that each one's end is
	// recorded as a shutdown, then the connection closes with the same code.
	sctx, scancel := context.WithCancelCause(context.WithoutCancel(ctx))
	defer scancel(nil)
	stopShutdown := context.AfterFunc(ctx, func() {
		scancel(wire.ErrShutdown)
		_ = conn.CloseWithError(wire.QUICShutdown, "server shutting down")
	})
	defer stopShutdown()
	// A connection that ends under its streams (the client went away) ends
	// their sessions: a session blocked writing to a destination that does not
	// read, and reading one that does not write, would otherwise never touch
	// its stream again and outlive the client. A cut that ended the connection
	// (shutdown, expiry) set its own cause first.
	stopGone := context.AfterFunc(conn.Context(), func() { scancel(wire.ErrClientGone) })
	defer stopGone()

	if s.web != nil || s.connect != nil {
		go refuseUniStreams(conn)
	}
	cs := new(tls.ConnectionState) // shared by the streams, which only read it
	*cs = conn.ConnectionState().TLS
	remote := conn.RemoteAddr().String()
	identity, notAfter := s.connIdentity(cs)
	if m := s.carrierMux(); m != nil {
		// A carrier session this connection runs over, now or after it
		// moves there, is proven to be a device's (package proxy/carrier).
		m.AddConn(conn, identity)
		defer m.RemoveConn(conn)
	}
	// The connection may not outlive the certificate that authenticated it.
	actx, acancel := context.WithDeadline(drain, notAfter)
	defer acancel()

	var streams sync.WaitGroup
	open := newConnStreams() // what op "bye" waits for (bye.go)
	sctx = context.WithValue(sctx, connStreamsKey{}, open)
	var served, refused atomic.Int64
	flood := newCancelFlood(func() {
		s.log.Warn("QUIC connection closed: its client cancelled more requests before their answer than it let be answered (rapid reset)",
			"remote", remote, "identity", identity)
		_ = conn.CloseWithError(wire.QUICInternal, "too many requests cancelled before their answer")
	})
	credit := newStreamCredit(maxStreams)
	defer credit.stop()
	var connEnd error // why the connection itself ended, when it did
	for {
		str, err := conn.AcceptStream(actx)
		if err != nil {
			if actx.Err() == nil {
				// quic-go fails AcceptStream with the connection's close
				// error before it cancels the connection's context: the
				// context alone may not know yet why the connection ended.
				connEnd = err
			}
			break
		}
		qs := wire.NewQUICStream(conn, str)
		if !s.acquire() {
			qs.Abort(wire.QUICRefused)
			credit.ended(str)
			refused.Add(1)
			s.log.Warn("QUIC stream refused: too many connections", "remote", remote, "max_conns", s.lim().MaxConns)
			continue
		}
		served.Add(1)
		s.stats.quicStreams.Add(1)
		streams.Add(1)
		open.start()
		var endOnce sync.Once
		ended := func() { endOnce.Do(open.end) }
		qs.OnReadEnd(ended) // the session read the client's direction to its end
		go func() {
			defer streams.Done()
			defer ended() // or the request is over
			defer credit.ended(str)
			defer s.release()
			s.serveStreamOf(sctx, qs, cs, "quic", flood)
		}()
	}
	// The connection takes no new requests now (drain, or the certificate
	// expired), but stays up for the streams it has: a stream opened meanwhile is
	// refused at once (docs/PROTOCOL.md, section 6.3) rather than left unanswered
	// until the connection closes.
	rctx, stopRefusing := context.WithCancel(ctx)
	refusing := make(chan struct{})
	go func() {
		defer close(refusing)
		code := wire.QUICRefused
		if drain.Err() == nil && !time.Now().Before(notAfter) {
			code = wire.QUICCertExpired
		}
		for {
			str, err := conn.AcceptStream(rctx)
			if err != nil {
				return
			}
			wire.NewQUICStream(conn, str).Abort(code)
			str.ReleaseStreamCredit()
			refused.Add(1)
		}
	}()
	streams.Wait()
	if drain.Err() != nil {
		// An agent's connection: the sessions it serves for dialers finish
		// first, unless the drain is cut short (docs/PROTOCOL.md, section 6.3).
		select {
		case <-s.holds.none(conn):
		case <-ctx.Done():
		case <-conn.Context().Done():
		}
	}
	stopRefusing()
	<-refusing

	code, msg, end := wire.QUICNoError, "", "closed by client"
	switch {
	case conn.Context().Err() != nil:
		if cause := context.Cause(conn.Context()); cause != nil {
			end = cause.Error()
		}
	case connEnd != nil:
		end = connEnd.Error()
	case ctx.Err() != nil || drain.Err() != nil:
		code, msg, end = wire.QUICShutdown, "server shutting down", "server shutting down"
	case !time.Now().Before(notAfter):
		code, msg, end = wire.QUICCertExpired, "client certificate expired; run dlogin", "client certificate expired"
	}
	_ = conn.CloseWithError(code, msg)
	attrs := []slog.Attr{
		slog.String("remote", remote),
		slog.String("identity", identity),
		slog.Int64("streams", served.Load()),
		slog.Int64("streams_refused", refused.Load()),
		slog.Duration("duration", time.Since(start)),
		slog.String("end", end),
	}
	if n := s.udp.quicDrops.Dropped(); n > 0 { // the server's total, over all connections
		attrs = append(attrs, slog.Int64("quic_receive_queue_dropped_total", n))
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "quic connection", attrs...)
}
