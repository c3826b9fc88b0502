package pgstore

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/proxy"
)

// maxPeerPublic bounds how many public keys PeerPublic returns.
const maxPeerPublic = 4096

// PeerPublic lists the public exposures ("tcp/PORT", "udp/PORT", "sni/NAME")
// that instances other than self serve now (a current lease), with the
// serving instance's peer address, for proxy.Server.SetPeerPublic: this
// instance then keeps those ports open and routes those server names to the
// serving instance.
func (db *DB) PeerPublic(ctx context.Context, self string) ([]PeerExposure, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	rows, err := db.pool.Query(ctx, `SELECT h.key, i.peer_address FROM tp_holds h
		JOIN tp_instances i ON i.name = h.instance
		WHERE h.instance <> '' AND h.instance <> $1 AND h.lease_until > now()
			AND (h.key LIKE 'tcp/%' OR h.key LIKE 'udp/%' OR h.key LIKE 'sni/%')
		ORDER BY h.key LIMIT $2`, self, maxPeerPublic)
	if err != nil {
		return nil, fmt.Errorf("reading the public exposures other instances serve: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (PeerExposure, error) {
		var e PeerExposure
		err := r.Scan(&e.Key, &e.PeerAddress)
		return e, err
	})
}

// PeerExposure is a public exposure another instance serves, and that
// instance's peer address.
type PeerExposure struct{ Key, PeerAddress string }

// AgentRoutes lists the instances other than self that serve one of owner's
// reverse names now (a current lease), one route per instance with one of its
// names there and that name's epoch, for proxy.PeerOptions.AgentRoutes: an
// agent's pickup that reached self is offered to them.
func (db *DB) AgentRoutes(ctx context.Context, self, owner string) ([]proxy.PeerRoute, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	rows, err := db.pool.Query(ctx, `SELECT DISTINCT ON (h.instance) h.instance, i.peer_address, h.epoch, h.key FROM tp_holds h
		JOIN tp_instances i ON i.name = h.instance
		WHERE h.owner = $1 AND h.instance <> '' AND h.instance <> $2 AND h.lease_until > now()
			AND h.key NOT LIKE 'tcp/%' AND h.key NOT LIKE 'udp/%' AND h.key NOT LIKE 'sni/%'
		ORDER BY h.instance, h.key LIMIT 8`, owner, self)
	if err != nil {
		return nil, fmt.Errorf("reading which instances serve %s: %w", owner, err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (proxy.PeerRoute, error) {
		var rt proxy.PeerRoute
		err := r.Scan(&rt.Instance, &rt.Addr, &rt.Epoch, &rt.Key)
		return rt, err
	})
}

// InstanceAddr is the peer address of the running instance name ("" when it
// has no row), for proxy.PeerOptions.InstanceAddr.
func (db *DB) InstanceAddr(ctx context.Context, name string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var addr string
	err := db.pool.QueryRow(ctx, `SELECT peer_address FROM tp_instances WHERE name = $1`, name).Scan(&addr)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", nil
	}
	return addr, err
}
