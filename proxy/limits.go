package proxy

import (
	"sync"

	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// Bounds per device identity. MaxConns bounds the whole server; these keep one
// device (a stolen key, a runaway script) from taking all of it, so that every
// other identity is served meanwhile. They count per device ("user@device"),
// not per user: a device that misbehaves must not lock its owner's other
// devices out, and a device is what holds a certificate and a key.
const (
	// CodeTooManySessions: the identity has as many sessions open as the server
	// allows (Config.MaxSessionsPerIdentity).
	CodeTooManySessions = "too_many_sessions"
	// CodeTooManyNames: a listen would leave the identity holding more reverse
	// names and public exposures than the server allows
	// (ReverseOptions.MaxNamesPerIdentity).
	CodeTooManyNames = reverse.CodeTooManyNames
	// CodeTooManyPending: the identity has as many dials of reverse names waiting
	// for their agents as the server allows (ReverseOptions.MaxPendingPerIdentity).
	CodeTooManyPending = "too_many_pending"
)

// Defaults of the bounds per identity: far above what one person's device
// does (a few dozen tunnels, a handful of exposed services), far below what
// takes a server's slots from everyone else.
const (
	DefaultMaxSessionsPerIdentity = 512
	DefaultMaxNamesPerIdentity    = 64
	DefaultMaxPendingPerIdentity  = 128
)

// identityCount counts something per device identity, with a bound.
type identityCount struct {
	mu sync.Mutex
	n  map[string]int
}

// acquire takes one for id unless id already has max; it returns how many id
// holds (before taking one).
func (c *identityCount) acquire(id string, max int) (held int, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = make(map[string]int)
	}
	held = c.n[id]
	if held >= max {
		return held, false
	}
	c.n[id] = held + 1
	return held, true
}

func (c *identityCount) release(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[id] <= 1 {
		delete(c.n, id)
		return
	}
	c.n[id]--
}

func (c *identityCount) count(id string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[id]
}

// countSession takes one of ss's identity's session slots for the session's
// lifetime; serveStream gives it back (releaseSession) however the session ends.
func (s *Server) countSession(ss *session) *wire.HelloError {
	id := ss.id.DeviceID
	held, ok := s.perID.acquire(id, s.lim().MaxSessionsPerIdentity)
	if !ok {
		return wire.Errorf(CodeTooManySessions, "%s already has %d sessions open through this server, the limit per device (max-sessions-per-identity); close some and try again", ss.id, held)
	}
	ss.counted = true
	return nil
}

// releaseSession gives back the session slot countSession took, if any.
func (s *Server) releaseSession(ss *session) {
	if ss.hold != nil {
		ss.hold()
	}
	if ss.counted {
		ss.counted = false
		s.perID.release(ss.id.DeviceID)
	}
}

// acquirePending takes one of id's slots for a dial waiting for an agent to pick
// it up; the caller releases it (r.pendingPerID.release) when the wait ends.
func (r *reverseRegistry) acquirePending(id authz.Identity) *wire.HelloError {
	held, ok := r.pendingPerID.acquire(id.DeviceID, r.opts.MaxPendingPerIdentity)
	if !ok {
		return wire.Errorf(CodeTooManyPending, "%s already has %d sessions waiting for reverse agents to pick them up, the limit per device (max-pending-per-identity); try again once they are answered (within %s)", id, held, r.opts.PickupTimeout)
	}
	return nil
}
