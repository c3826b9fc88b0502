package clients

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
// Dialer's dials are streams of a TLS connection it holds to the server,
// not a TLS connection each. A new tunnel then costs a stream's opening (its
// hello in the first frame) instead of a TCP connect and a handshake, and an
// idle one a few hundred bytes instead of a TLS connection's buffers and two
// goroutines in each process. A server that does not select tp-mux/1 (an
// older tpd) is dialed a connection per tunnel, as before, and the Dialer
// remembers that for tlsMuxNoneFor.

const (
	// tlsMuxNoneFor is how long a Dialer remembers that its server does not
	// speak tp-mux/1.
	tlsMuxNoneFor = 10 * time.Minute
	// maxTLSMuxConns bounds the tp-mux connections a Dialer holds: with
	// wire.MuxMaxStreams streams each, far beyond what a server lets one
	// identity open (its max-sessions-per-identity).
	maxTLSMuxConns = 64
)

// Client-side timers of a tp-mux connection; variables so that tests can
// shorten them.
var (
	// tlsMuxIdle: a connection without streams for this long is closed.
	tlsMuxIdle = time.Minute
	// tlsMuxTick is how often a connection pings the server and checks its
	// timers.
	tlsMuxTick = wire.MuxPing
	// tlsMuxLife: no stream is opened on a connection older than this (a new
	// one picks up a renewed certificate); it closes once its streams ended.
	tlsMuxLife = time.Hour
)

// tlsMuxPool is a Dialer's tp-mux connections to its server.
type tlsMuxPool struct {
	mu      sync.Mutex
	conns   []*mux.Conn
	opening chan struct{} // closed when the connection being opened is in conns (or failed)
	none    time.Time     // the server selected tp/1: no tp-mux/1 until then
	closed  bool
	opened  int // connections opened (TLSMuxStats)
	streams int // dials carried as streams
}

// TLSMuxStats says how many tp-mux connections this Dialer opened and how
// many dials went as streams of one.
func (d *Dialer) TLSMuxStats() (conns, streams int) {
	p := &d.tlsMux
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.opened, p.streams
}

// live reports whether the pool holds a connection that has not ended.
func (p *tlsMuxPool) live() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.conns {
		if !m.Ended() {
			return true
		}
	}
	return false
}

// counted counts a request carried as a stream (TLSMuxStats).
func (p *tlsMuxPool) counted() {
	p.mu.Lock()
	p.streams++
	p.mu.Unlock()
}

// usable is a connection of the pool that takes a stream now, or nil; it
// never opens one.
func (p *tlsMuxPool) usable() *mux.Conn {
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

// close ends the pool's connections (Dialer.Close): their open streams are cut.
func (p *tlsMuxPool) close() {
	p.mu.Lock()
	p.closed = true
	all := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, m := range all {
		m.Fail(errors.New("the dialer closed"))
	}
}

// muxConfig is sessionConfig offering tp-mux/1 before tp/1.
func (d *Dialer) muxConfig() (*tls.Config, error) {
	base, err := d.sessionConfig()
	if err != nil {
		return nil, err
	}
	c := &d.muxCfg
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cfg == nil || c.base != base {
		cfg := base.Clone() // shares ClientSessionCache: tickets resume either
		cfg.NextProtos = []string{wire.ALPNMux, wire.ALPN}
		c.base, c.cfg = base, cfg
	}
	return c.cfg, nil
}

// muxCfgCache is the cache of muxConfig.
type muxCfgCache struct {
	mu   sync.Mutex
	base *tls.Config
	cfg  *tls.Config
}

// tlsMuxConn returns a connection that takes a stream now: one the Dialer
// holds, the one being opened, or a new one. plain, when not nil, is a new
// connection on which the server selected tp/1 (an older server): the
// caller runs its request on it, as on a connection of its own.
func (d *Dialer) tlsMuxConn(ctx context.Context) (m *mux.Conn, plain *tls.Conn, err error) {
	p := &d.tlsMux
	for {
		p.mu.Lock()
		now := time.Now()
		if p.closed { // a Dialer used after Close: a connection per request, as before
			p.mu.Unlock()
			return nil, nil, nil
		}
		live := p.conns[:0]
		for _, c := range p.conns {
			if !c.Ended() {
				live = append(live, c)
			}
		}
		clear(p.conns[len(live):])
		p.conns = live
		for _, c := range p.conns {
			if c.Usable(now) {
				p.mu.Unlock()
				return c, nil, nil
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
				return nil, nil, fmt.Errorf("connecting to TP server %s: %w", d.Server, ctx.Err())
			}
		}
		if len(p.conns) >= maxTLSMuxConns {
			p.mu.Unlock()
			return nil, nil, fmt.Errorf("connecting to TP server %s: %d tp-mux connections (up to %d tunnels each) are open and take no further tunnel; close some tunnels", d.Server, maxTLSMuxConns, wire.MuxMaxStreams)
		}
		wait := make(chan struct{})
		p.opening = wait
		p.mu.Unlock()

		m, plain, err = d.openTLSMux(ctx)
		p.mu.Lock()
		p.opening = nil
		close(wait)
		switch {
		case m != nil:
			p.conns = append(p.conns, m)
			p.opened++
		case plain != nil:
			p.none = time.Now().Add(tlsMuxNoneFor)
		}
		p.mu.Unlock()
		// plain runs on batchConn: wire.Truncated and wire.Abort find what is
		// below it (Unwrap); only Bridge's buffer-free wait is not used for it.
		return m, plain, err
	}
}

// openTLSMux connects to the server offering tp-mux/1 and starts the
// multiplexer's client end, or returns the connection as plain when the
// server selected tp/1.
func (d *Dialer) openTLSMux(ctx context.Context) (*mux.Conn, *tls.Conn, error) {
	cfg, err := d.muxConfig()
	if err != nil {
		return nil, nil, err
	}
	// crypto/tls writes each record with a Write of its own: a batch of
	// frames (up to 256 KiB) would be 17 syscalls. batchConn (e2e.go) gathers
	// the records of one batch into a few.
	var batch *batchConn
	conn, err := d.connectTLSWith(ctx, cfg, func(c net.Conn) net.Conn { batch = &batchConn{Conn: c}; return batch })
	if err != nil {
		return nil, nil, err
	}
	if conn.ConnectionState().NegotiatedProtocol != wire.ALPNMux {
		return nil, conn, nil
	}
	o := mux.Options{Client: true, Label: "tp-mux connection to TP server " + d.Server, Noun: "connection",
		StreamLabel: "tp-mux stream", Peer: "server",
		MaxStreams: wire.MuxMaxStreams, MaxPayload: wire.MuxMaxPayload, SendPayload: wire.MuxMaxPayload,
		StreamWindow: wire.MuxStreamWindow, MaxStreamWindow: wire.MuxMaxStreamWindow, GrowBudget: 32 << 20,
		Tick: tlsMuxTick, Dead: wire.MuxDead, Idle: tlsMuxIdle, Life: tlsMuxLife, AbortCodes: true,
		WriteFrames: func(c net.Conn, b []byte) error {
			batch.begin()
			_, err := c.Write(b)
			if ferr := batch.end(); err == nil {
				err = ferr
			}
			return err
		}}
	if na, ok := d.certNotAfter(); ok {
		o.Expires = na
		o.ExpiredReason = "the client certificate expired at " + na.UTC().Format(time.RFC3339) + "; " + d.expiredAdvice()
	}
	return mux.New(conn, o, nil), nil, nil
}

// streamRefused says whether a stream's failure before its answer means that
// nothing of it reached a destination: the server refused it (ABORT refused,
// while it drains) or the connection ended before the server answered.
func streamRefused(err error, m *mux.Conn) bool {
	return errors.Is(err, wire.ErrTruncated) && (m.Err() != nil || errors.Is(err, mux.ErrRefused)) // Err is set before the streams are cut
}
