package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// tp-mux/1 (docs/PROTOCOL.md, section 9.9): over the TLS transport, a
// client's requests are streams of a TLS connection it holds to the server,
// not a TLS connection each. A new tunnel then costs a stream's opening (its
// hello in the first frame) instead of a TCP connect and a handshake, and an
// idle one a few hundred bytes instead of a TLS connection's buffers and two
// goroutines in each process. A server that does not select tp-mux/1 (an
// older tpd) is dialed a connection per request, as before, and the pool
// remembers that for MuxNoneFor.

const (
	// MuxNoneFor is how long a pool remembers that its server does not speak
	// tp-mux/1.
	MuxNoneFor = 10 * time.Minute
	// maxMuxConns bounds the tp-mux connections a pool holds: with
	// wire.MuxMaxStreams streams each, far beyond what a server lets one
	// identity open (its max-sessions-per-identity).
	maxMuxConns = 64
	// Client-side timers of a tp-mux connection (MuxPool's Idle and Life).
	muxIdle = time.Minute
	muxLife = time.Hour
)

// MuxClient is what a MuxPool needs of the client whose connections it holds.
type MuxClient interface {
	// ServerAddr is the server's host:port, for messages.
	ServerAddr() string
	// SessionConfig is the client's TLS configuration for the server (ALPN
	// tp/1); the pool offers tp-mux/1 before it, on a clone that shares its
	// session cache.
	SessionConfig() (*tls.Config, error)
	// ConnectTLSWith connects to the server with cfg (TCP connect and handshake,
	// within the client's bounds); wrap, when not nil, is placed below TLS.
	ConnectTLSWith(ctx context.Context, cfg *tls.Config, wrap func(net.Conn) net.Conn) (*tls.Conn, error)
	// CertExpiry is when the client certificate ends the connection, and the
	// sentence that says so; ok is false when it is not known.
	CertExpiry() (notAfter time.Time, reason string, ok bool)
}

// MuxPool is a client's tp-mux connections to its server. The zero value is
// ready to use; it must not be copied after first use.
type MuxPool struct {
	// Idle: a connection without streams for this long is closed (zero: a
	// minute). Tick is how often a connection pings the server and checks its
	// timers (zero: wire.MuxPing). Life: no stream is opened on a connection
	// older than this (a new one picks up a renewed certificate); it closes
	// once its streams ended (zero: an hour). Set before first use.
	Idle, Tick, Life time.Duration

	mu      sync.Mutex
	conns   []*mux.Conn
	opening chan struct{} // closed when the connection being opened is in conns (or failed)
	none    time.Time     // the server selected tp/1: no tp-mux/1 until then
	closed  bool
	opened  int // connections opened (Stats)
	streams int // requests carried as streams

	cfgBase, cfg *tls.Config // the cache of config
}

// Stats says how many tp-mux connections the pool opened and how many
// requests went as streams of one (Counted).
func (p *MuxPool) Stats() (conns, streams int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.opened, p.streams
}

// Live reports whether the pool holds a connection that has not ended.
func (p *MuxPool) Live() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.conns {
		if !m.Ended() {
			return true
		}
	}
	return false
}

// Counted counts a request carried as a stream (Stats).
func (p *MuxPool) Counted() {
	p.mu.Lock()
	p.streams++
	p.mu.Unlock()
}

// Usable is a connection of the pool that takes a stream now, or nil; it
// never opens one.
func (p *MuxPool) Usable() *mux.Conn {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	for _, m := range p.conns {
		if m.Usable(now) {
			return m
		}
	}
	return nil
}

// Conns is the connections the pool holds, oldest first.
func (p *MuxPool) Conns() []*mux.Conn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]*mux.Conn(nil), p.conns...)
}

// NoneUntil is when the pool tries tp-mux/1 again after its server selected
// tp/1 (zero when it did not).
func (p *MuxPool) NoneUntil() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.none
}

// Close ends the pool's connections (the client closes): their open streams
// are cut, and Conn opens no further one.
func (p *MuxPool) Close() {
	p.mu.Lock()
	p.closed = true
	all := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, m := range all {
		m.Fail(errors.New("the dialer closed"))
	}
}

// config is base offering tp-mux/1 before tp/1.
func (p *MuxPool) config(base *tls.Config) *tls.Config {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cfg == nil || p.cfgBase != base {
		cfg := base.Clone() // shares ClientSessionCache: tickets resume either
		cfg.NextProtos = []string{wire.ALPNMux, wire.ALPN}
		p.cfgBase, p.cfg = base, cfg
	}
	return p.cfg
}

// Conn returns a connection that takes a stream now: one the pool holds, the
// one being opened, or a new one. plain, when not nil, is a new connection on
// which the server selected tp/1 (an older server): the caller runs its
// request on it, as on a connection of its own. All three are nil when the
// pool makes no connection (closed, or the server does not speak tp-mux/1):
// the request goes on a TLS connection of its own.
func (p *MuxPool) Conn(ctx context.Context, c MuxClient) (m *mux.Conn, plain *tls.Conn, err error) {
	for {
		p.mu.Lock()
		now := time.Now()
		if p.closed { // a client used after Close: a connection per request, as before
			p.mu.Unlock()
			return nil, nil, nil
		}
		live := p.conns[:0]
		for _, m := range p.conns {
			if !m.Ended() {
				live = append(live, m)
			}
		}
		clear(p.conns[len(live):])
		p.conns = live
		for _, m := range p.conns {
			if m.Usable(now) {
				p.mu.Unlock()
				return m, nil, nil
			}
		}
		if now.Before(p.none) {
			p.mu.Unlock()
			return nil, nil, nil
		}
		if wait := p.opening; wait != nil {
			p.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, nil, fmt.Errorf("connecting to TP server %s: %w", c.ServerAddr(), ctx.Err())
			}
		}
		if len(p.conns) >= maxMuxConns {
			p.mu.Unlock()
			return nil, nil, fmt.Errorf("connecting to TP server %s: %d tp-mux connections (up to %d tunnels each) are open and take no further tunnel; close some tunnels", c.ServerAddr(), maxMuxConns, wire.MuxMaxStreams)
		}
		wait := make(chan struct{})
		p.opening = wait
		p.mu.Unlock()

		m, plain, err = p.open(ctx, c)
		p.mu.Lock()
		p.opening = nil
		close(wait)
		switch {
		case m != nil:
			p.conns = append(p.conns, m)
			p.opened++
		case plain != nil:
			p.none = time.Now().Add(MuxNoneFor)
		}
		p.mu.Unlock()
		// plain runs on BatchConn: wire.Truncated and wire.Abort find what is
		// below it (Unwrap); only Bridge's buffer-free wait is not used for it.
		return m, plain, err
	}
}

// open connects to the server offering tp-mux/1 and starts the multiplexer's
// client end, or returns the connection as plain when the server selected
// tp/1.
func (p *MuxPool) open(ctx context.Context, c MuxClient) (*mux.Conn, *tls.Conn, error) {
	base, err := c.SessionConfig()
	if err != nil {
		return nil, nil, err
	}
	// crypto/tls writes each record with a Write of its own: a batch of
	// frames (up to 256 KiB) would be 17 syscalls. BatchConn gathers the
	// records of one batch into a few.
	var batch *BatchConn
	conn, err := c.ConnectTLSWith(ctx, p.config(base), func(c net.Conn) net.Conn { batch = &BatchConn{Conn: c}; return batch })
	if err != nil {
		return nil, nil, err
	}
	if conn.ConnectionState().NegotiatedProtocol != wire.ALPNMux {
		return nil, conn, nil
	}
	o := mux.Options{Client: true, Label: "tp-mux connection to TP server " + c.ServerAddr(), Noun: "connection",
		StreamLabel: "tp-mux stream", Peer: "server",
		MaxStreams: wire.MuxMaxStreams, MaxPayload: wire.MuxMaxPayload, SendPayload: wire.MuxMaxPayload,
		StreamWindow: wire.MuxStreamWindow, MaxStreamWindow: wire.MuxMaxStreamWindow, GrowBudget: 32 << 20,
		Tick: or(p.Tick, wire.MuxPing), Dead: wire.MuxDead, Idle: or(p.Idle, muxIdle), Life: or(p.Life, muxLife), AbortCodes: true,
		WriteFrames: func(c net.Conn, b []byte) error {
			batch.Begin()
			_, err := c.Write(b)
			if ferr := batch.End(); err == nil {
				err = ferr
			}
			return err
		}}
	if na, reason, ok := c.CertExpiry(); ok {
		o.Expires, o.ExpiredReason = na, reason
	}
	return mux.New(conn, o, nil), nil, nil
}

// or is d, or def when d is zero.
func or(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// StreamRefused says whether a stream's failure before its answer means that
// nothing of it reached a destination: the server refused it (ABORT refused,
// while it drains) or the connection ended before the server answered.
func StreamRefused(err error, m *mux.Conn) bool {
	return errors.Is(err, wire.ErrTruncated) && (m.Err() != nil || errors.Is(err, mux.ErrRefused)) // Err is set before the streams are cut
}
