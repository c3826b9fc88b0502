package proxy

import (
	"context"
	"errors"
	"log/slog"
	"sync"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/proxy/wire"
)

// h3Own is the state of an HTTP/3 server whose connections tpd serves with
// http3's RawServerConn, reading the clients' control streams and the
// connections' datagrams itself (wire.H3ServerConn): the proxy names', where
// CONNECT-IP and CONNECT-UDP carry packets in HTTP Datagrams. quic-go's
// http3 would put each datagram on a queue of 32 per request stream that
// drops the rest of a burst without a count (docs/IP.md, "Datagrams on
// arrival").
//
// Such connections are not http3.Server's (ServeQUICConn), so its graceful
// shutdown does not see them: grace ends their accepting of new requests
// (refused with H3_REQUEST_REJECTED, which a client may retry elsewhere; no
// GOAWAY, whose control stream http3 keeps to itself), h3Server.shutdown
// waits for them as for its own, and closing closes what is left.
type h3Own struct {
	mu      sync.Mutex
	conns   map[*quic.Conn]*wire.H3ServerConn
	wg      sync.WaitGroup
	grace   context.Context // ends when a shutdown starts
	endGrac context.CancelFunc
	closing context.Context // ends when the shutdown stops waiting
	close   context.CancelFunc
}

func newH3Own() *h3Own {
	o := &h3Own{conns: map[*quic.Conn]*wire.H3ServerConn{}}
	o.grace, o.endGrac = context.WithCancel(context.Background())
	o.closing, o.close = context.WithCancel(context.Background())
	return o
}

// add registers conn; false once a shutdown started.
func (o *h3Own) add(conn *quic.Conn) (*wire.H3ServerConn, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.grace.Err() != nil {
		return nil, false
	}
	hc := wire.NewH3ServerConn(conn)
	o.conns[conn] = hc
	o.wg.Add(1)
	return hc, true
}

func (o *h3Own) remove(conn *quic.Conn) {
	o.mu.Lock()
	delete(o.conns, conn)
	o.mu.Unlock()
	o.wg.Done()
}

// connContext adds conn's H3ServerConn to the requests' context
// (http3.Server.ConnContext).
func (o *h3Own) connContext(ctx context.Context, conn *quic.Conn) context.Context {
	if o == nil {
		return ctx
	}
	o.mu.Lock()
	hc := o.conns[conn]
	o.mu.Unlock()
	if hc == nil {
		return ctx
	}
	return wire.WithH3ServerConn(ctx, hc)
}

// drain starts the grace and waits until every connection ended or ctx ends;
// then it closes what is left.
func (o *h3Own) drain(ctx context.Context) {
	o.mu.Lock()
	o.endGrac()
	o.mu.Unlock()
	done := make(chan struct{})
	go func() { o.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	o.close()
}

// serveH3Proxy is serveH3 for the proxy names' HTTP/3: http3 serves the
// requests (RawServerConn), tpd reads the client's unidirectional streams and
// the datagrams (h3Own).
func (s *Server) serveH3Proxy(ctx context.Context, conn *quic.Conn, h3 *h3Server, what string) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopForce := context.AfterFunc(s.force, cancel)
	defer stopForce()
	stopClosing := context.AfterFunc(h3.own.closing, cancel)
	defer stopClosing()
	stop := context.AfterFunc(ctx, func() {
		_ = conn.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "server shutting down")
	})
	defer stop()
	defer func() { _ = conn.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "") }()
	hc, ok := h3.own.add(conn)
	if !ok {
		return
	}
	defer h3.own.remove(conn)
	rc, err := h3.NewRawServerConn(conn) // sends tpd's SETTINGS
	if err != nil {
		s.log.LogAttrs(ctx, slog.LevelDebug, what+" connection ended",
			slog.String("remote", conn.RemoteAddr().String()), slog.String("err", err.Error()))
		return
	}
	go hc.ServeUniStreams()
	hc.Datagrams.Start()

	var wg sync.WaitGroup
	defer wg.Wait() // as ServeQUICConn: until every request's handler returned
	actx, acancel := context.WithCancel(conn.Context())
	defer acancel()
	stopGrace := context.AfterFunc(h3.own.grace, acancel)
	defer stopGrace()
	for {
		str, err := conn.AcceptStream(actx)
		if err != nil {
			if conn.Context().Err() != nil || ctx.Err() != nil {
				var appErr *quic.ApplicationError
				if !errors.As(err, &appErr) || appErr.ErrorCode != quic.ApplicationErrorCode(http3.ErrCodeNoError) {
					s.log.LogAttrs(ctx, slog.LevelDebug, what+" connection ended",
						slog.String("remote", conn.RemoteAddr().String()), slog.String("err", err.Error()))
				}
				return
			}
			break // the grace: refuse new requests until the connection ends
		}
		forget := hc.Track(str)
		wg.Go(func() { defer forget(); rc.HandleRequestStream(str) })
	}
	for {
		str, err := conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		str.ReleaseStreamCredit()
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestRejected))
		str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestRejected))
	}
}
