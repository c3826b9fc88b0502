package clients

// The agent's (tp expose) transport choice, the same as a Dialer's
// (carrier_auto.go, transport.go): with transport auto and no carrier forced its
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

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/transport"
)

// connectRaced connects an agent's QUIC connection with qcfg by the carrier
// race. The connection's socket is its own (not the Dialer's shared one): an
// agent whose server stops keeps its old connection while its sessions drain
// and races a new one meanwhile. The socket is closed when the connection
// ends.
func (d *Dialer) connectRaced(ctx context.Context, cfg *tls.Config, qcfg *quic.Config) (*quic.Conn, error) {
	r, err := d.raceCarriers(ctx, cfg, qcfg)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (no answer over UDP or any carrier: is the TP server reachable from this network?)", errors.Join(err, ctx.Err()))
		}
		return nil, fmt.Errorf("connecting to TP server %s over QUIC: %w", d.quicAddr(), d.forgetRejected(explainQUICErr(err, d.expiredAdvice)))
	}
	d.reportRaced(r)
	if mc, ok := r.pc.(*transport.MovingConn); ok {
		go d.watchCarrier(r.conn, mc)
	}
	go func() {
		<-r.conn.Context().Done()
		_ = r.tr.Close()
		_ = r.pc.Close()
	}()
	return r.conn, nil
}
