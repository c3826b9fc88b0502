package transport

// The agent's (tp expose) transport choice, the same as a Client's
// (race.go, client.go): with transport auto and no carrier forced its
// QUIC connection is raced over UDP and the stream carriers, on a socket of
// its own that it moves between carriers when its carrier stalls and back to
// UDP when UDP answers again; the carrier that won is remembered per server
// and network, and TP's plain TLS transport, when QUIC got through on no
// carrier, for DefaultFallbackTTL.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"

	"github.com/quic-go/quic-go"
)

// connectRaced connects an agent's QUIC connection with qcfg by the carrier
// race. The connection's socket is its own (not the Client's shared one): an
// agent whose server stops keeps its old connection while its sessions drain
// and races a new one meanwhile. The socket is closed when the connection
// ends.
func (cl *Client) connectRaced(ctx context.Context, cfg *tls.Config, qcfg *quic.Config) (*quic.Conn, error) {
	r, err := cl.raceCarriers(ctx, cfg, qcfg)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (no answer over UDP or any carrier: is the TP server reachable from this network?)", errors.Join(err, ctx.Err()))
		}
		return nil, fmt.Errorf("connecting to TP server %s over QUIC: %w", cl.quicAddr(), cl.forgetRejected(ExplainQUIC(err, cl.expiredAdvice)))
	}
	cl.reportRaced(r)
	if mc, ok := r.pc.(*MovingConn); ok {
		go cl.watchCarrier(r.conn, mc)
	}
	go func() {
		<-r.conn.Context().Done()
		_ = r.tr.Close()
		_ = r.pc.Close()
	}()
	return r.conn, nil
}

// ConnectAgent opens an agent's own QUIC connection with qcfg: unlike the
// Client's shared one it accepts streams, one per session the server opens.
// It is raced over the carriers as the shared one is (connectRaced), or made
// on the Client's socket.
func (cl *Client) ConnectAgent(ctx context.Context, qcfg *quic.Config) (*quic.Conn, error) {
	addr := cl.quicAddr()
	cfg, err := cl.tlsConfig()
	if err != nil {
		return nil, err
	}
	qcfg = qcfg.Clone()
	qcfg.Tracer = cl.dropTracer()
	if cl.racesCarriers() {
		return cl.connectRaced(ctx, cfg, qcfg)
	}
	tr, err := cl.packetTransport(ctx)
	if err != nil {
		return nil, err
	}
	var raddr net.Addr
	if cc, ok := tr.Conn.(*CarrierConn); ok {
		raddr = cc.ServerAddr()
	} else if raddr, err = net.ResolveUDPAddr("udp", addr); err != nil {
		return nil, fmt.Errorf("TP server address %q: %w", addr, err)
	}
	conn, err := tr.Dial(ctx, raddr, cfg, configFor(tr.Conn, qcfg))
	if err != nil {
		return nil, fmt.Errorf("connecting to TP server %s over QUIC: %w", addr, cl.forgetRejected(ExplainQUIC(err, cl.expiredAdvice)))
	}
	return conn, nil
}
