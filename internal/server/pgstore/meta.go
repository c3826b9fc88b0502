package pgstore

import (
	"context"
	"errors"
	"fmt"
)

// ErrOtherCA means this tpd's CA is not the one the database's instances use.
var ErrOtherCA = errors.New("this tpd's CA is not the one the database's other instances use")

// ClaimCA records the root certificate's fingerprint on first use, and
// refuses a tpd whose CA differs: its device certificates would not be
// trusted by the other instances, and theirs not by it.
func (db *DB) ClaimCA(ctx context.Context, fingerprint string) error {
	var have string
	err := db.WithLock(ctx, func(ctx context.Context) error {
		if _, err := db.pool.Exec(ctx, "INSERT INTO tp_meta (key, value) VALUES ('ca_root_fingerprint', $1) ON CONFLICT DO NOTHING", fingerprint); err != nil {
			return err
		}
		return db.pool.QueryRow(ctx, "SELECT value FROM tp_meta WHERE key = 'ca_root_fingerprint'").Scan(&have)
	})
	if err != nil {
		return fmt.Errorf("database: record the CA's fingerprint: %w", err)
	}
	if have != fingerprint {
		return fmt.Errorf("%w: its root is %s and theirs is %s; give every instance the same ca/ directory (copy it from an instance that runs) before it starts", ErrOtherCA, fingerprint, have)
	}
	return nil
}
