package reverse

// What a reverse name, public port or pass-through server name is held by,
// as it outlives an agent: the holds saved across a restart (Hold), and the
// shared record several TP server instances keep in one database
// (HoldStore), whose leases fence an instance that could not renew them.
// docs/SCALE.md describes the timings and what agents and dialers see.

import (
	"context"
	"encoding/json"
	"fmt"
	"time"
)

// Hold is a reverse name or public exposure held by a device, as saved across
// restarts (proxy.ReverseOptions.Holds, SaveHolds). Key is a full reverse name,
// "tcp/PORT" or "sni/NAME"; Until is the end of the grace period of a hold whose
// agent is offline, zero for one whose agent was online when it was saved.
type Hold struct {
	Key   string    `json:"key"`
	Owner string    `json:"owner"`
	Label string    `json:"label,omitempty"`
	Until time.Time `json:"until,omitzero"`
}

// MarshalHolds and UnmarshalHolds are the file format of saved holds (JSON).
func MarshalHolds(h []Hold) ([]byte, error) {
	return json.MarshalIndent(map[string]any{"v": 1, "holds": h}, "", "  ")
}

// UnmarshalHolds reads what MarshalHolds wrote.
func UnmarshalHolds(b []byte) ([]Hold, error) {
	var f struct {
		V     int    `json:"v"`
		Holds []Hold `json:"holds"`
	}
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, err
	}
	if f.V != 1 {
		return nil, fmt.Errorf("saved reverse holds have version %d; expected 1", f.V)
	}
	return f.Holds, nil
}

// HoldStore is the shared record of holds (internal/server/pgstore implements it on
// PostgreSQL). A key is a full reverse name, "tcp/PORT", "udp/PORT" or
// "sni/NAME"; an owner is a device ID. Every time is judged by the store's
// clock, never by an instance's.
type HoldStore interface {
	// Claim takes every key for owner, served by this instance, with a lease
	// of lease and a hold for the owner of hold (both from the store's now),
	// and raises each key's epoch. A key is taken only when its row is
	// owner's already or its hold has ended; otherwise nothing is taken and
	// the error is a *HeldError naming the holder.
	Claim(ctx context.Context, owner string, keys []string, lease, hold time.Duration) ([]HoldLease, error)
	// Renew extends the lease and hold of the keys this instance still serves
	// at the given epochs, and returns those keys; the others were taken over.
	Renew(ctx context.Context, leases []HoldLease, lease, hold time.Duration) ([]string, error)
	// Release ends this instance's service of the keys (at the given epochs)
	// and keeps them the owner's for grace; grace 0 frees them.
	Release(ctx context.Context, leases []HoldLease, grace time.Duration) error
	// Prune forgets holds that have ended.
	Prune(ctx context.Context) error
	// Owner is the device that holds key (served, or reserved for its owner's
	// return), on whichever instance; held is false when none does.
	Owner(ctx context.Context, key string) (owner string, held bool, err error)
}

// AccessHoldStore is a HoldStore that records with a claim whether the
// claimed keys are open to enrolled devices only (a reverse HTTP name exposed
// with --devices-only), and returns it with their routes
// (proxy.PeerRoute.DevicesOnly): an instance that carries such a name's requests to
// the serving one must ask for the device certificate at its own handshake.
// Without it, every claim is recorded as open to anyone, and a devices-only
// name reached through another instance answers 403 even to a device.
type AccessHoldStore interface {
	HoldStore
	ClaimAccess(ctx context.Context, owner string, keys []string, devicesOnly bool, lease, hold time.Duration) ([]HoldLease, error)
}

// HoldLease is a key and the epoch its claim gave it: the fencing token. A
// session for a key is opened only while the epoch this instance holds is the
// newest it knows and its lease has not run out.
type HoldLease struct {
	Key   string
	Epoch int64
}

// HeldError is a claim refused because another identity holds Key; Serving
// says whether an instance serves it now (else it is reserved for its owner's
// return).
type HeldError struct {
	Key, Owner string
	Serving    bool
}

func (e *HeldError) Error() string {
	if e.Serving {
		return fmt.Sprintf("%s is registered by another identity; choose another", DescribeKey(e.Key))
	}
	return fmt.Sprintf("%s belongs to another identity, whose agent is reconnecting; choose another", DescribeKey(e.Key))
}

// TooManyHeldError is a claim refused because the owner would hold more keys
// than the store's bound over every instance (the store counts what the
// owner's agents on all instances hold or have reserved).
type TooManyHeldError struct {
	Owner            string
	Held, Asked, Max int
}

func (e *TooManyHeldError) Error() string {
	return fmt.Sprintf("%s already holds %d reverse names and public exposures on the TP server's instances (through its other agents, or reserved for an agent that is reconnecting) and asks for %d more; the server allows %d per device (max-reverse-names-per-identity); stop the agents it no longer needs and try again", e.Owner, e.Held, e.Asked, e.Max)
}
