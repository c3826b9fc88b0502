package clients

import (
	"context"
	"crypto/tls"
	"net"
	"time"
)

// Over the TLS transport a Dialer's dials are streams of the tp-mux/1
// connections it holds to the server (transport.MuxPool, docs/PROTOCOL.md
// section 9.9); muxClient is what the pool needs of the Dialer.

// TLSMuxStats says how many tp-mux connections this Dialer opened and how
// many dials went as streams of one.
func (d *Dialer) TLSMuxStats() (conns, streams int) { return d.tlsMux.Stats() }

// muxClient is a Dialer as its tp-mux pool's client.
type muxClient Dialer

func (c *muxClient) ServerAddr() string { return c.Server }

func (c *muxClient) SessionConfig() (*tls.Config, error) { return (*Dialer)(c).sessionConfig() }

func (c *muxClient) ConnectTLS(ctx context.Context, cfg *tls.Config, wrap func(net.Conn) net.Conn) (*tls.Conn, error) {
	return (*Dialer)(c).connectTLSWith(ctx, cfg, wrap)
}

func (c *muxClient) CertExpiry() (time.Time, string, bool) {
	d := (*Dialer)(c)
	na, ok := d.certNotAfter()
	if !ok {
		return time.Time{}, "", false
	}
	return na, "the client certificate expired at " + na.UTC().Format(time.RFC3339) + "; " + d.expiredAdvice(), true
}
