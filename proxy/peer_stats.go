package proxy

import (
	"net"
	"sync"
	"sync/atomic"
)

// Peer session counters (Stats.Peer): sessions carried between instances, by
// direction (out: this instance forwarded a session to the one that serves the
// name; in: another instance forwarded one here), opened, refused and active
// now. No instance, name or identity in any label.
const (
	peerDirOut = iota
	peerDirIn
)

// PeerStats are the peer session counters of one direction.
type PeerStats struct {
	Opened, Refused, Active int64
}

type peerCounters struct {
	opened, refused [2]atomic.Int64
	peerActive      [2]atomic.Int64
}

func (c *counters) peerOut(ok bool) { c.peerCount(peerDirOut, ok) }
func (c *counters) peerIn(ok bool)  { c.peerCount(peerDirIn, ok) }

func (c *counters) peerCount(dir int, ok bool) {
	if ok {
		c.opened[dir].Add(1)
	} else {
		c.refused[dir].Add(1)
	}
}

// peerStats is the snapshot for Stats: "out" and "in".
func (c *counters) peerStats() map[string]PeerStats {
	m := make(map[string]PeerStats, 2)
	for dir, name := range []string{"out", "in"} {
		m[name] = PeerStats{Opened: c.opened[dir].Load(), Refused: c.refused[dir].Load(), Active: c.peerActive[dir].Load()}
	}
	return m
}

// peerCounted is a peer connection counted in an active gauge until it
// closes. Unwrap lets Abort and Truncated reach the TLS connection below.
type peerCounted struct {
	net.Conn
	gauge *atomic.Int64
	once  sync.Once
}

func newPeerCounted(c net.Conn, gauge *atomic.Int64) *peerCounted {
	gauge.Add(1)
	return &peerCounted{Conn: c, gauge: gauge}
}

func (p *peerCounted) Close() error {
	p.once.Do(func() { p.gauge.Add(-1) })
	return p.Conn.Close()
}

// CloseWrite half-closes the TLS connection (close_notify).
func (p *peerCounted) CloseWrite() error {
	if cw, ok := p.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (p *peerCounted) Unwrap() net.Conn { return p.Conn }
