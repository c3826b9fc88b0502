package peer

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Options let an instance reach the reverse names other instances serve
// (proxy.Config.Peers). They need proxy.Config.Reverse.Store.
type Options struct {
	// Self is this instance's name, as the HoldStore records it.
	Self string
	// Route finds the instance that serves key now: its name, peer address
	// and the key's epoch there; ok is false when no instance serves it. It
	// may cache (invalidated when holds change); Forget drops what it cached
	// for key after a forward that found the route wrong.
	Route  func(ctx context.Context, key string) (Route, bool, error)
	Forget func(key string)
	// AgentRoutes lists, for an agent's pickup that reached this instance
	// while its session is pending elsewhere, the instances that serve the
	// agent's device now: one route per instance, with one of its reverse
	// names there (Key) and that name's epoch. Nil: pickups are not forwarded.
	AgentRoutes func(ctx context.Context, deviceID string) ([]Route, error)
	// ServerTLS accepts peer connections (ALPN tp-peer/1): its
	// VerifyConnection must accept node certificates only. ClientTLS is the
	// configuration that dials instance (VerifyConnection must accept only that
	// instance's node certificate).
	ServerTLS *tls.Config
	ClientTLS func(instance string) *tls.Config
	// Dial opens the TCP connection to a peer address; nil uses net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// InstanceAddr is the peer address of a running instance (by name), to
	// tell the instance that forwarded a session why it ends; nil: not told.
	InstanceAddr func(ctx context.Context, instance string) (string, error)
	// Idle is how many handshaken connections are kept ready per peer (a new
	// session then costs no handshake). Default 2; negative keeps none.
	Idle int
}

// Route is where a key is served: by Instance, reachable at Addr
// (host:port of its shared port), at Epoch.
type Route struct {
	Instance, Addr string
	Epoch          int64
	// DevicesOnly: the key is a reverse HTTP name its exposer opened to
	// enrolled devices only (reverse.AccessHoldStore recorded it with the claim).
	DevicesOnly bool
	// Key is the name the route is for (AgentRoutes only).
	Key string
}

const (
	// IdleMax is how long a ready peer connection waits in the pool; the
	// serving side waits OpenWait for its open, which is longer, so a
	// pooled connection is never one the other side already dropped for idling.
	IdleMax  = 20 * time.Second
	OpenWait = 45 * time.Second
	// maxPeers bounds the pools (one per peer instance).
	maxPeers = 256
)

// Pool keeps handshaken connections to the other instances ready: a new
// session then costs no handshake. A nil Pool is peering turned off.
type Pool struct {
	opts Options
	mu   sync.Mutex
	idle map[string]chan *pooledConn // instance+addr → ready connections
	done bool
}

type pooledConn struct {
	conn  *tls.Conn
	since time.Time
}

// NewPool fills o's defaults; a nil o turns peering off (a nil Pool).
func NewPool(o *Options) *Pool {
	if o == nil {
		return nil
	}
	opts := *o
	if opts.Idle == 0 {
		opts.Idle = 2
	}
	if opts.Dial == nil {
		var d net.Dialer
		opts.Dial = d.DialContext
	}
	return &Pool{opts: opts, idle: map[string]chan *pooledConn{}}
}

// ServerTLS is the configuration for a ClientHello offering tp-peer/1.
func (p *Pool) ServerTLS() *tls.Config {
	c := p.opts.ServerTLS.Clone()
	c.MinVersion, c.MaxVersion = tls.VersionTLS13, 0
	c.NextProtos = []string{wire.PeerALPN}
	c.SessionTicketsDisabled = true // a peer's node certificate is checked on every connection
	return c
}

// Close drops the ready connections; later ones are not kept.
func (p *Pool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done = true
	for k, ch := range p.idle {
		close(ch)
		for pc := range ch {
			_ = pc.conn.Close()
		}
		delete(p.idle, k)
	}
}

// Dial opens a handshaken peer connection to r, outside the pool.
func (p *Pool) Dial(ctx context.Context, r Route) (*tls.Conn, error) {
	raw, err := p.opts.Dial(ctx, "tcp", r.Addr)
	if err != nil {
		return nil, err
	}
	cfg := p.opts.ClientTLS(r.Instance).Clone()
	cfg.NextProtos = []string{wire.PeerALPN}
	cfg.MinVersion = tls.VersionTLS13
	conn := tls.Client(wire.NewEOFConn(raw), cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, err
	}
	if conn.ConnectionState().NegotiatedProtocol != wire.PeerALPN {
		_ = conn.Close()
		return nil, fmt.Errorf("the instance at %s does not speak %s (is it an older tpd, or not tpd?)", r.Addr, wire.PeerALPN)
	}
	return conn, nil
}

// Get returns a ready connection to r (pooled says it waited in the pool) and
// has the pool refilled in the background.
func (p *Pool) Get(ctx context.Context, r Route) (conn *tls.Conn, pooled bool, err error) {
	k := r.Instance + "\x00" + r.Addr
	p.mu.Lock()
	ch := p.idle[k]
	if ch == nil && !p.done && p.opts.Idle > 0 && len(p.idle) < maxPeers {
		ch = make(chan *pooledConn, p.opts.Idle)
		p.idle[k] = ch
	}
	p.mu.Unlock()
	if ch != nil {
		defer p.refill(ch, k, r)
	}
	for ch != nil {
		select {
		case pc, ok := <-ch:
			if !ok {
				ch = nil
				break
			}
			if time.Since(pc.since) < IdleMax {
				return pc.conn, true, nil
			}
			_ = pc.conn.Close()
			continue
		default:
			ch = nil
		}
	}
	conn, err = p.Dial(ctx, r)
	return conn, false, err
}

// refill tops ch up with one connection, in the background, bounded by
// IdleMax; a failure keeps nothing (the next session dials).
func (p *Pool) refill(ch chan *pooledConn, k string, r Route) {
	if len(ch) >= cap(ch) {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), IdleMax)
		defer cancel()
		conn, err := p.Dial(ctx, r)
		if err != nil {
			return
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.done || p.idle[k] != ch {
			_ = conn.Close()
			return
		}
		select {
		case ch <- &pooledConn{conn: conn, since: time.Now()}:
		default:
			_ = conn.Close()
		}
	}()
}

// Options returns the options the pool runs with (defaults filled).
func (p *Pool) Options() Options { return p.opts }
