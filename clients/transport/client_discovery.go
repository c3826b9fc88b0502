package transport

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// discoveryState is what a Client learnt from the server's discovery document.
type discoveryState struct {
	sync.Mutex
	tried bool // fetched (or failed to) once in this Client's life
	doc   *wire.Discovery
}

// discoveryURL is where the Client fetches the server's document.
func (cl *Client) discoveryURL() string {
	if cl.DiscoveryURL != "" {
		return cl.DiscoveryURL
	}
	return "https://" + cl.Server + wire.DiscoveryPath
}

// discover returns the server's discovery document: the Client's, the
// Cache's, or fetched now, once per Client; nil when the server did not give
// one (an older tpd, a failure: only a debug line says so).
func (cl *Client) discover(ctx context.Context) *wire.Discovery {
	cl.disco.Lock()
	defer cl.disco.Unlock()
	if cl.disco.tried {
		return cl.disco.doc
	}
	cl.disco.tried = true
	if cl.Cache != nil {
		if doc, ok := cl.Cache.Discovery(cl.Server); ok {
			cl.disco.doc = &doc
			return cl.disco.doc
		}
	}
	cfg, err := cl.tlsConfig()
	if err == nil {
		var doc wire.Discovery
		if doc, err = FetchDiscovery(ctx, cl.discoveryURL(), cfg); err == nil {
			cl.disco.doc = &doc
			if cl.Cache != nil {
				_ = cl.Cache.PutDiscovery(cl.Server, doc) // a cache that cannot be written only costs a fetch
			}
			return cl.disco.doc
		}
	}
	cl.logger().LogAttrs(ctx, slog.LevelDebug, "no transport discovery document; racing QUIC and TLS as usual",
		slog.String("server", cl.Server), slog.String("err", err.Error()))
	return nil
}

// quicNotOffered reports whether auto should skip QUIC without trying it: the
// server's discovery document, fetched when nothing is cached for the server,
// offers no QUIC. TLS is then remembered as the transport, as a race won by
// TLS would be.
func (cl *Client) quicNotOffered(ctx context.Context) bool {
	if cl.Cache != nil && cl.Cache.Get(cl.Server) != "" {
		return false
	}
	doc := cl.discover(ctx)
	if doc == nil {
		return false
	}
	if _, ok := doc.Find(wire.DiscoverQUIC); ok {
		return false
	}
	cl.quic.mu.Lock()
	cl.quic.tlsUntil = time.Now().Add(DefaultCacheTTL)
	cl.quic.mu.Unlock()
	if cl.Cache != nil {
		_ = cl.Cache.Put(cl.Server, TLS)
	}
	return true
}
