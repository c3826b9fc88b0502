package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// liveSession is an established session as the registry knows it.
type liveSession struct {
	cs     tls.ConnectionState // the handshake that authenticated the client
	req    authz.Request       // the request the policy allowed
	revoke context.CancelCauseFunc
	// closed: a re-check closed the session. Re-checks may run at once (a
	// revocation's and one for a policy edit); only the first to close a
	// session counts it.
	closed atomic.Bool
	// onAllow, when set, receives each re-check's allowing decision (a
	// CONNECT-IP tunnel applies a changed grant: connectip.go).
	onAllow func(authz.Decision)
	// identityOnly: a re-check asks only whether the identity is still
	// accepted (a browser's WebTransport session, whose requests are
	// sessions of their own: webtransport.go).
	identityOnly bool
}

// registry holds the live sessions of a Server.
type registry struct {
	mu   sync.Mutex
	live map[*liveSession]struct{}
}

// add registers ls and returns the function that removes it.
func (r *registry) add(ls *liveSession) (remove func()) {
	r.mu.Lock()
	if r.live == nil {
		r.live = make(map[*liveSession]struct{})
	}
	r.live[ls] = struct{}{}
	r.mu.Unlock()
	return func() {
		r.mu.Lock()
		delete(r.live, ls)
		r.mu.Unlock()
	}
}

func (r *registry) snapshot() []*liveSession {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*liveSession, 0, len(r.live))
	for ls := range r.live {
		out = append(out, ls)
	}
	return out
}

// Live returns the number of established sessions.
func (s *Server) Live() int {
	s.sessions.mu.Lock()
	defer s.sessions.mu.Unlock()
	return len(s.sessions.live)
}

// Recheck asks again, for every established session, whether its identity is still
// accepted (deny list, enrolment, groups — through Config.Identify) and whether the
// policy still allows its request with the identity as it is now. Sessions that are
// no longer allowed are closed, and their log line says why. Callers run it when the
// policy revision, a user's groups or the deny list changed.
//
// A policy evaluation error is retried once and then closes the session: continuous
// authorization fails closed like the first decision. closed counts the sessions
// this call closed: one that a concurrent Recheck closed first is not counted
// again.
func (s *Server) Recheck(ctx context.Context) (checked, closed int) {
	for _, ls := range s.sessions.snapshot() {
		if ctx.Err() != nil {
			return checked, closed
		}
		if ls.closed.Load() {
			continue // closed by another re-check, and ending
		}
		checked++
		if reason, identity, ok := s.stillAllowed(ctx, ls); !ok && ls.closed.CompareAndSwap(false, true) {
			closed++
			ls.revoke(&wire.RevokedError{Reason: reason, Identity: identity != nil, Revoked: errors.Is(identity, authz.ErrRevoked)})
			s.log.LogAttrs(ctx, slog.LevelInfo, "live session closed by re-check",
				slog.String("identity", ls.req.Identity.DeviceID),
				slog.String("action", ls.req.Action),
				slog.String("dest", fmt.Sprintf("%s:%d", ls.req.Destination.Host, ls.req.Destination.Port)),
				slog.String("reason", reason))
		}
	}
	return checked, closed
}

// stillAllowed re-decides one live session. The reason is for the log and says why
// the session may not continue; identity is why the identity itself was
// refused, nil when it was not.
func (s *Server) stillAllowed(ctx context.Context, ls *liveSession) (reason string, identity error, ok bool) {
	id, err := s.cfg.Identify(ls.cs)
	if err != nil {
		return "identity no longer accepted: " + err.Error(), err, false
	}
	if ls.identityOnly {
		return "", nil, true
	}
	if id.NotAfter.IsZero() || ls.req.Identity.NotAfter.Before(id.NotAfter) {
		id.NotAfter = ls.req.Identity.NotAfter
	}
	req := ls.req
	req.Identity = id
	var lastErr error
	for range 2 {
		req.Time = time.Now()
		actx, cancel := context.WithTimeout(ctx, s.lim().DialTimeout)
		dec, err := s.cfg.Authorizer.Authorize(actx, req)
		cancel()
		if err == nil {
			if !dec.Allow {
				if dec.Reason == "" {
					return "the policy no longer allows this destination", nil, false
				}
				return "the policy no longer allows it: " + dec.Reason, nil, false
			}
			if ls.onAllow != nil {
				ls.onAllow(dec)
			}
			return "", nil, true
		}
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	return "policy evaluation failed during re-check: " + lastErr.Error(), nil, false
}

// policyError is the refusal for a request whose policy evaluation failed. The
// client learns what kind of failure it was, not the policy's internals (the
// server's log has them).
func policyError(err error) *wire.HelloError {
	if errors.Is(err, context.DeadlineExceeded) {
		return wire.Errorf(wire.CodePolicyError, "the policy did not decide in time, so the request was denied; try again, and tell the TP administrator if it persists")
	}
	return wire.Errorf(wire.CodePolicyError, "policy evaluation failed, so the request was denied; the TP administrator can find the cause in tpd's log")
}
