package clients

// The agent's (tp expose) transport choice, the same as a Dialer's
// (carrier_auto.go, quic.go): with transport auto and no carrier forced its
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
	"time"

	"github.com/quic-go/quic-go"
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
		return nil, fmt.Errorf("connecting to TP server %s over QUIC: %w", d.quicAddr(), d.forgetRejected(explainQUICErr(err)))
	}
	d.reportRaced(r)
	if mc, ok := r.pc.(*movingConn); ok {
		go d.watchCarrier(r.conn, mc)
	}
	go func() {
		<-r.conn.Context().Done()
		_ = r.tr.Close()
		_ = r.pc.Close()
	}()
	return r.conn, nil
}

// autoSkipsQUIC reports whether transport auto goes straight to TP's plain
// TLS transport: it won a race recently (in this process, or remembered for
// this server and network), or the server's discovery document offers no
// QUIC.
func (d *Dialer) autoSkipsQUIC(ctx context.Context) bool {
	d.quic.mu.Lock()
	tlsWon := time.Now().Before(d.quic.tlsUntil)
	d.quic.mu.Unlock()
	return tlsWon || d.Cache != nil && d.Cache.Get(d.Server) == TransportTLS || d.quicNotOffered(ctx)
}

// rememberTransport remembers that transport (TransportQUIC or
// TransportTLS) won auto's choice for the server on this network; TLS, a
// fallback, for DefaultFallbackTTL only, after which QUIC is tried again.
func (d *Dialer) rememberTransport(transport string) {
	if transport == TransportTLS {
		d.quic.mu.Lock()
		d.quic.tlsUntil = time.Now().Add(DefaultFallbackTTL)
		d.quic.mu.Unlock()
	}
	if d.Cache == nil {
		return
	}
	ttl := time.Duration(0)
	if transport == TransportTLS {
		ttl = DefaultFallbackTTL
	}
	_ = d.Cache.PutFor(d.Server, transport, ttl) // a cache that cannot be written only costs races
}
