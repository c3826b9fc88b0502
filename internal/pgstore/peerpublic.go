package pgstore

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// maxPeerPublic bounds how many public keys PeerPublic returns.
const maxPeerPublic = 4096

// PeerPublic lists the public exposures ("tcp/PORT", "udp/PORT", "sni/NAME")
// that instances other than self serve now (a current lease), for
// proxy.Server.SetPeerPublic: this instance then keeps those ports open and
// routes those server names to the serving instance.
func (db *DB) PeerPublic(ctx context.Context, self string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	rows, err := db.pool.Query(ctx, `SELECT key FROM tp_holds
		WHERE instance <> '' AND instance <> $1 AND lease_until > now()
			AND (key LIKE 'tcp/%' OR key LIKE 'udp/%' OR key LIKE 'sni/%')
		ORDER BY key LIMIT $2`, self, maxPeerPublic)
	if err != nil {
		return nil, fmt.Errorf("reading the public exposures other instances serve: %w", err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}
