package tpd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/tp-proxy/tp/internal/lib/atomicfile"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/reverse"
)

// reverseOptions are the reverse listeners' settings: the zone and grace period,
// the public ports the administrator allows, the server names SNI pass-through
// must never take, and the holds saved across restarts.
//
// With a database the holds live there instead (pgstore.Holds: leases,
// epochs, fencing; docs/SCALE.md), and the holds file is not used.
func (d *Daemon) reverseOptions() (proxy.ReverseOptions, error) {
	if d.db != nil {
		opts := d.reverseOptionsBase()
		d.instance = instanceName()
		holds := pgstore.NewHolds(d.db, d.instance)
		holds.MaxPerOwner = opts.MaxNamesPerIdentity // over every instance, not only this one's agents
		opts.Store = holds
		opts.Lease, opts.Renew = d.cfg.ReverseLease, d.cfg.ReverseRenew
		// Another instance's claim or release may have moved one of ours:
		// renew (and so learn it) at once rather than at the next tick.
		d.db.OnChange(pgstore.TopicHolds, func(context.Context) error {
			if p := d.proxy; p != nil {
				p.KickLeases()
			}
			return nil
		})
		return opts, nil
	}
	holds, err := loadHolds(d.cfg.ReverseHoldsFile())
	if err != nil {
		return proxy.ReverseOptions{}, err
	}
	opts := d.reverseOptionsBase()
	opts.Holds = holds
	opts.SaveHolds = func(h []reverse.Hold) {
		// Sessions still ending while tpd closes (their handlers may outlive
		// Serve) release names; the holds as Close found them are what a
		// restart needs, and nothing is written into the data dir after Close.
		d.holdsMu.Lock()
		defer d.holdsMu.Unlock()
		if d.holdsClosed {
			return
		}
		if err := saveHolds(d.cfg.ReverseHoldsFile(), h); err != nil {
			d.log.Error("saving reverse holds failed; a restart may forget who holds which name", "err", err)
		}
	}
	return opts, nil
}

// instanceName names this process among the instances on one database: the
// host name and a random part, so that a restarted tpd is a new instance.
func instanceName() string {
	host, _ := os.Hostname()
	var b [6]byte
	_, _ = rand.Read(b[:])
	return host + "/" + hex.EncodeToString(b[:])
}

func (d *Daemon) reverseOptionsBase() proxy.ReverseOptions {
	host, _, _ := net.SplitHostPort(d.cfg.Listen)
	return proxy.ReverseOptions{
		Zone:          d.cfg.ReverseZone,
		Grace:         d.cfg.ReverseGrace,
		RestartGrace:  d.cfg.ReverseRestartGrace,
		PickupTimeout: d.cfg.ReversePickupTimeout,
		PublicPorts: func(network string, port int) bool {
			return d.config().PublicPortAllowed(network, port) // reload.go may change them
		},
		PublicHost: host,
		PublicSNI:  d.publicSNIAllowed,
		// Bounds per device identity.
		MaxNamesPerIdentity:   d.cfg.MaxReverseNamesPerIdentity,
		MaxPendingPerIdentity: d.cfg.MaxPendingPerIdentity,
	}
}

// publicSNIAllowed refuses tpd's own names and the websites' names for SNI
// pass-through: those must keep reaching tpd.
func (d *Daemon) publicSNIAllowed(name string) error {
	switch {
	case d.site().IsOwn(name):
		return fmt.Errorf("%s is one of the TP server's own names; it cannot be passed through", name)
	case d.site().IsSite(name):
		return fmt.Errorf("%s is a website the TP server serves itself; it cannot be passed through", name)
	case slices.Contains(d.cfg.ProxyNames, strings.ToLower(strings.TrimSuffix(name, "."))):
		return fmt.Errorf("%s is one of the TP server's proxy names (proxy-names); it cannot be passed through", name)
	}
	return nil
}

// passthrough is proxy.Config.Passthrough: the names agents expose publicly by
// SNI, behind the guard that never lets them claim tpd's or a site's name.
func (d *Daemon) passthrough() proxy.PassthroughFunc {
	return d.passthroughGuard(func(name string) (func(context.Context, net.Conn), bool) {
		return d.proxy.PublicSNI(name)
	})
}

func loadHolds(path string) ([]reverse.Hold, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	h, err := reverse.UnmarshalHolds(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (delete it to forget who holds which reverse name)", path, err)
	}
	return h, nil
}

// saveHolds writes the file atomically: a crash leaves the old or the new one.
func saveHolds(path string, h []reverse.Hold) error {
	b, err := reverse.MarshalHolds(h)
	if err != nil {
		return err
	}
	return atomicfile.Write(path, b, 0o600)
}
