package tpd

// This instance's row in tp_instances while it drains, and the list of
// instances `tpd status` shows (docs/SCALE.md, "Instances").

import (
	"context"
	"time"

	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/server/pgstore"
)

// drainInstance marks this instance's row draining every tick until drained
// is closed (the drain has ended), then deletes it. Each mark is bounded and
// skipped while the database is known lost, so that it cannot hold the stop up.
func (d *Daemon) drainInstance(ctx context.Context, addr string, tick <-chan time.Time, drained <-chan struct{}) {
	dctx := context.WithoutCancel(ctx)
	for {
		if d.databaseHealth() == "" {
			bctx, cancel := context.WithTimeout(dctx, 2*time.Second)
			err := d.db.Heartbeat(bctx, pgstore.Instance{Name: d.instance, PeerAddress: addr, PolicyRevision: d.policy.Revision(), Draining: true})
			cancel()
			if err != nil {
				d.log.Warn("peering: cannot record in the database that this instance drains", "err", err)
			}
		}
		select {
		case <-tick:
			continue
		case <-drained:
		}
		break
	}
	fctx, cancel := context.WithTimeout(dctx, 5*time.Second)
	_ = d.db.ForgetInstance(fctx, d.instance, time.Hour)
	cancel()
}

// instanceStale is how old an instance's heartbeat may be before `tpd status`
// calls it stale: two heartbeats (every reverse-renew) missed.
func (d *Daemon) instanceStale() time.Duration { return 3 * d.cfg.ReverseRenew }

// instances lists every instance on the database for `tpd status`, or says
// why it cannot; nil without a database.
func (d *Daemon) instances(ctx context.Context) ([]admin.Instance, string) {
	if d.db == nil {
		return nil, ""
	}
	if why := d.databaseHealth(); why != "" {
		return nil, why // without waiting for a database known to be lost
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	rows, err := d.db.Instances(ctx, 0)
	if err != nil {
		return nil, err.Error()
	}
	out := make([]admin.Instance, 0, len(rows))
	for _, r := range rows {
		out = append(out, admin.Instance{
			Name: r.Name, PeerAddress: r.PeerAddress, PolicyRevision: r.PolicyRevision, Started: r.Started,
			HeartbeatAge: r.Age.Seconds(), Draining: r.Draining, Stale: r.Age > d.instanceStale(), Self: r.Name == d.instance,
		})
	}
	return out, ""
}

// otherInstances names the other instances on the database with a current
// heartbeat (draining ones too: they still hold sessions), for a revocation to
// say who else ends the revoked sessions; nil when the list cannot be read.
func (d *Daemon) otherInstances(ctx context.Context) []string {
	all, why := d.instances(ctx)
	if why != "" || all == nil {
		return nil
	}
	others := []string{}
	for _, i := range all {
		if !i.Self && !i.Stale {
			others = append(others, i.Name)
		}
	}
	return others
}
