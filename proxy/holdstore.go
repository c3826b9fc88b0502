package proxy

// Leases of reverse names, public ports and pass-through server names when
// several TP server instances share one database (ReverseOptions.Store):
// reverse.Registry renews them and fences what it could not renew in time
// (proxy/reverse/leases.go); the server starts it and passes on other
// instances' changes. docs/SCALE.md describes the timings and what agents and
// dialers see.

import (
	"context"
	"time"

	"github.com/tp-proxy/tp/proxy/reverse"
)

// CodeHoldsUnavailable refuses a registration this instance cannot record in
// the shared database (unreachable): the agent retries.
const CodeHoldsUnavailable = reverse.CodeHoldsUnavailable

// Default lease timings (ReverseOptions.Lease, Renew).
const (
	DefaultLease = 15 * time.Second
	DefaultRenew = 5 * time.Second
)

// RunLeases renews this instance's leases every ReverseOptions.Renew, at once
// after Kick, and fences the keys whose lease runs out, until ctx ends. It
// does nothing without a Store.
func (s *Server) RunLeases(ctx context.Context) {
	if s.rev == nil {
		return
	}
	s.rev.RunLeases(ctx)
}

// KickLeases asks RunLeases to renew now: another instance claimed or
// released a key (LISTEN/NOTIFY), so a key of this instance may have moved.
func (s *Server) KickLeases() {
	if s.rev == nil {
		return
	}
	s.rev.Kick()
}

// SetHoldStoreFailHook makes every call to the hold store fail while fail
// returns true, as if this instance could not reach the database (tests of
// self-fencing of one instance while the others reach it).
func (s *Server) SetHoldStoreFailHook(fail func() bool) {
	if s.rev != nil {
		s.rev.SetStoreFailHook(fail)
	}
}
