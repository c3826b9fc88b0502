package pgstore

import (
	"context"
	"fmt"
	"time"

	"github.com/tp-proxy/tp/acme"
)

// SSOUsed records the ID tokens that enrolled a device by single sign-on in
// the database, so that a token shown to one instance is refused by every
// other: without it, each instance remembered its own, and a leaked token
// could enrol one device per instance. It implements acme.UsedTokens;
// PruneSSOUsed bounds the table.
type SSOUsed struct{ db *DB }

var _ acme.UsedTokens = SSOUsed{}

// NewSSOUsed is the used-token store on db.
func NewSSOUsed(db *DB) SSOUsed { return SSOUsed{db} }

// usedMargin keeps a record this much past the token's expiry: tpd checks
// the expiry on its own clock, the prune runs on the database's, and a
// record pruned while a tpd whose clock is behind still takes the token
// would let it enrol again.
const usedMargin = 10 * time.Minute

// UseOnce implements acme.UsedTokens: the insert that records the key is the
// check, so two instances shown the same token at once enrol one device.
func (u SSOUsed) UseOnce(ctx context.Context, key string, expires time.Time) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	tag, err := u.db.pool.Exec(ctx, "INSERT INTO tp_sso_used (hash, expires) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING", key, expires.Add(usedMargin))
	if err != nil {
		return false, fmt.Errorf("record a single sign-on in the database: %w", err)
	}
	return tag.RowsAffected() == 1, nil
}

// PruneSSOUsed deletes the records of tokens that have expired (they are
// refused for their expiry already), and says how many went.
func (u SSOUsed) PruneSSOUsed(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	tag, err := u.db.pool.Exec(ctx, "DELETE FROM tp_sso_used WHERE expires <= now()")
	if err != nil {
		return 0, err
	}
	return tag.RowsAffected(), nil
}
