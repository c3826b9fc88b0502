package clients

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// discoveryState is what a Dialer learnt from the server's discovery document.
type discoveryState struct {
	sync.Mutex
	tried bool // fetched (or failed to) once in this Dialer's life
	doc   *wire.Discovery
}

// discoveryURL is where the Dialer fetches the server's document.
func (d *Dialer) discoveryURL() string {
	if d.DiscoveryURL != "" {
		return d.DiscoveryURL
	}
	return "https://" + d.Server + wire.DiscoveryPath
}

// discover returns the server's discovery document: the Dialer's, the
// Cache's, or fetched now, once per Dialer; nil when the server did not give
// one (an older tpd, a failure: only a debug line says so).
func (d *Dialer) discover(ctx context.Context) *wire.Discovery {
	d.disco.Lock()
	defer d.disco.Unlock()
	if d.disco.tried {
		return d.disco.doc
	}
	d.disco.tried = true
	if d.Cache != nil {
		if doc, ok := d.Cache.Discovery(d.Server); ok {
			d.disco.doc = &doc
			return d.disco.doc
		}
	}
	cfg, err := d.tlsConfig()
	if err == nil {
		var doc wire.Discovery
		if doc, err = FetchDiscovery(ctx, d.discoveryURL(), cfg); err == nil {
			d.disco.doc = &doc
			if d.Cache != nil {
				_ = d.Cache.PutDiscovery(d.Server, doc) // a cache that cannot be written only costs a fetch
			}
			return d.disco.doc
		}
	}
	d.logger().LogAttrs(ctx, slog.LevelDebug, "no transport discovery document; racing QUIC and TLS as usual",
		slog.String("server", d.Server), slog.String("err", err.Error()))
	return nil
}

// quicNotOffered reports whether auto should skip QUIC without trying it: the
// server's discovery document, fetched when nothing is cached for the server,
// offers no QUIC. TLS is then remembered as the transport, as a race won by
// TLS would be.
func (d *Dialer) quicNotOffered(ctx context.Context) bool {
	if d.Cache != nil && d.Cache.Get(d.Server) != "" {
		return false
	}
	doc := d.discover(ctx)
	if doc == nil {
		return false
	}
	if _, ok := doc.Find(wire.DiscoverQUIC); ok {
		return false
	}
	d.quic.mu.Lock()
	d.quic.tlsUntil = time.Now().Add(DefaultTransportCacheTTL)
	d.quic.mu.Unlock()
	if d.Cache != nil {
		_ = d.Cache.Put(d.Server, TransportTLS)
	}
	return true
}

func (d *Dialer) logger() *slog.Logger {
	if d.Logger != nil {
		return d.Logger
	}
	return discardLog
}

var discardLog = slog.New(slog.DiscardHandler)
