package proxy

// The server's reverse registry: the registry of names, agents and pending
// sessions is reverse.Registry; the server keeps beside it the options it was
// made from, the holders of names served by reverse tunnels and the dials
// waiting for an agent per dialing device. The protocol operations that use
// it are in reverse.go.

import (
	"crypto/rand"
	"encoding/hex"

	"github.com/tp-proxy/tp/proxy/reverse"
)

type reverseRegistry struct {
	*reverse.Registry
	opts    ReverseOptions
	tunnels tunnelState // holders of names served by reverse tunnels (revtunnel_pool.go)
	// pendingPerID counts the dials waiting for an agent per dialing device (limits.go).
	pendingPerID identityCount
}

// newReverseRegistry is the registry of opts (defaults applied); hooks tie
// it to the server: its log, its listeners, the public ports' service and
// the lease counters.
func newReverseRegistry(opts ReverseOptions, hooks reverse.Hooks) *reverseRegistry {
	opts = opts.withDefaults()
	opts.HTTPTunnels = opts.HTTPTunnels.withDefaults()
	return &reverseRegistry{opts: opts, Registry: reverse.New(reverse.Options{
		Zone: opts.Zone, Grace: opts.Grace, RestartGrace: opts.RestartGrace,
		MaxPending: opts.MaxPending, MaxNamesPerIdentity: opts.MaxNamesPerIdentity, PickupTimeout: opts.PickupTimeout,
		Store: opts.Store, Lease: opts.Lease, Renew: opts.Renew,
		PublicPorts: opts.PublicPorts, PublicHost: opts.PublicHost,
		Holds: opts.Holds, SaveHolds: opts.SaveHolds,
	}, hooks)}
}

func newSessionID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
