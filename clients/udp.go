package clients

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// udpTrip is a UDP flow to addr as a request for the transport: a stream on the
// shared QUIC connection (with QUIC datagrams when the connection has them),
// a stream of a tp-mux connection (PROTOCOL 9.9: the capsules go on the
// stream) or a new TLS connection, chosen as for TCP dials. The flow is a
// *wire.UDPFlow.
func (d *Dialer) udpTrip(addr string, hello wire.ClientHello) transport.Trip {
	return transport.Trip{Kind: transport.TripUDP, What: "tp dial udp " + addr, Retry: (*earlyDial)(nil),
		Run: func(ctx context.Context, s *transport.Stream) (net.Conn, error) {
			return d.udpRequest(ctx, s, addr, hello)
		}}
}

// udpRequest registers the flow (so that no datagram the server sends right after
// its ok is lost), runs the hello exchange and starts the flow.
// On tp-mux the stream is opened first, empty; when it cannot be, the flow
// is refused there (s.Refused).
func (d *Dialer) udpRequest(ctx context.Context, s *transport.Stream, addr string, hello wire.ClientHello) (net.Conn, error) {
	if s.Mux != nil {
		if _, err := s.OpenMux(nil); err != nil {
			s.Refused = true
			return nil, err
		}
	}
	conn := s.Stream
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
		return nil, fmt.Errorf("tp dial udp %s via %s: %w", addr, d.Server, d.forgetRejected(explainHelloErr(err, d.expiredAdvice)))
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
