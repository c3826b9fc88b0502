package clients

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// dialUDP opens a UDP flow to addr: a stream on the shared QUIC connection (with
// QUIC datagrams when the connection has them) or a new TLS connection, chosen as
// for TCP dials. The result is a *wire.UDPFlow.
func (d *Dialer) dialUDP(ctx context.Context, addr string, hello wire.ClientHello) (net.Conn, error) {
	switch d.mode() {
	case TransportAuto, "":
		if d.liveQUIC() != nil {
			if c, conn, err := d.udpOnQUIC(ctx, addr, hello); conn != nil && !d.connLost(conn, err) {
				return c, err
			}
		}
		d.quic.mu.Lock()
		tlsWon := time.Now().Before(d.quic.tlsUntil)
		d.quic.mu.Unlock()
		if tlsWon || d.Cache != nil && d.Cache.Get(d.Server) == TransportTLS || d.quicNotOffered(ctx) {
			return d.udpOnTLS(ctx, addr, hello, nil)
		}
		winner, tconn, err := d.race(ctx)
		if err != nil {
			return nil, err
		}
		if d.Cache != nil {
			_ = d.Cache.Put(d.Server, winner)
		}
		if winner == TransportTLS {
			d.quic.mu.Lock()
			d.quic.tlsUntil = time.Now().Add(DefaultTransportCacheTTL)
			d.quic.mu.Unlock()
			return d.udpOnTLS(ctx, addr, hello, tconn)
		}
		fallthrough
	case TransportQUIC:
		for attempt := 0; ; attempt++ {
			c, conn, err := d.udpOnQUIC(ctx, addr, hello)
			if attempt == 0 && conn != nil && d.connLost(conn, err) && ctx.Err() == nil {
				continue // the connection died under us: try once on a fresh one
			}
			return c, err
		}
	case TransportTLS:
		return d.udpOnTLS(ctx, addr, hello, nil)
	default:
		return nil, fmt.Errorf("transport %q must be auto, quic or tls", d.Transport)
	}
}

// udpOnTLS opens the flow on conn when given (the connection that won auto's
// race), else as a stream of a tp-mux connection (PROTOCOL 9.9: the capsules
// go on the stream), else on a new TLS connection (an older server, the
// connections full, or --no-tls-mux).
func (d *Dialer) udpOnTLS(ctx context.Context, addr string, hello wire.ClientHello, conn *tls.Conn) (net.Conn, error) {
	if conn == nil && !d.NoTLSMux {
		m, plain, err := d.tlsMuxConn(ctx)
		if err != nil {
			return nil, err
		}
		conn = plain
		if m != nil {
			if st, err := m.Open(nil); err == nil {
				d.tlsMux.counted()
				c, err := d.udpRequest(ctx, st, addr, hello)
				if err == nil || !errors.Is(err, mux.ErrRefused) || ctx.Err() != nil {
					return c, err
				}
				// The server refused the stream unserved (it drains): on a
				// connection of its own.
			}
		}
	}
	if conn == nil {
		var err error
		if conn, err = d.connectTLS(ctx); err != nil {
			return nil, err
		}
	}
	return d.udpRequest(ctx, conn, addr, hello)
}

// udpOnQUIC opens the flow on a new stream of the Dialer's QUIC connections
// (openStream); it returns the connection it used, as requestQUIC does.
func (d *Dialer) udpOnQUIC(ctx context.Context, addr string, hello wire.ClientHello) (net.Conn, *quic.Conn, error) {
	conn, st, err := d.openStream(ctx, "tp dial udp "+addr)
	if err != nil {
		return nil, conn, err
	}
	c, err := d.udpRequest(ctx, st, addr, hello)
	return c, conn, err
}

// udpRequest registers the flow (so that no datagram the server sends right after
// its ok is lost), runs the hello exchange and starts the flow.
func (d *Dialer) udpRequest(ctx context.Context, conn wire.Stream, addr string, hello wire.ClientHello) (net.Conn, error) {
	flow, err := wire.NewUDPFlow(conn, 0, nil)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("tp dial udp %s: %w", addr, err)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	sh, err := exchange(conn, hello)
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		_ = flow.Close()
		return nil, fmt.Errorf("tp dial udp %s via %s: %w", addr, d.Server, d.forgetRejected(explainHelloErr(err)))
	}
	_ = conn.SetDeadline(time.Time{})
	if !sh.OK {
		_ = flow.Close()
		return nil, &RefusedError{Code: sh.Code, Reason: sh.Reason}
	}
	if err := flow.UseFlowID(sh.Flow); err != nil {
		flow.Abort(wire.QUICInternal) // a protocol error of the server's (PROTOCOL 9.5)
		return nil, fmt.Errorf("tp dial udp %s via %s: %w", addr, d.Server, err)
	}
	if sh.E2E {
		// A protected UDP reverse name: TLS with its agent inside the stream, and
		// the datagrams as capsules inside that (the flow above carries nothing).
		inner, err := d.innerTLS(ctx, conn, addr, false)
		if err != nil {
			return nil, err
		}
		flow = wire.NewCapsuleFlow(inner.(wire.Stream), 0)
	}
	flow.Start()
	return flow, nil
}
