package pgstore

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Keys shares secret keys among the instances on one database: the QUIC
// stateless reset key (a reset from any instance is valid for a connection
// of another, and a restarted instance resets its old clients at once) and
// the TLS session-ticket keys (a ticket from one instance resumes on another).
// It implements proxy.TicketKeySource. Rotation and expiry are judged by the
// database's clock, so instances whose clocks differ agree.
type Keys struct{ db *DB }

// NewKeys is the key store on db.
func NewKeys(db *DB) Keys { return Keys{db} }

// keyPurposeMax bounds a purpose name.
const keyPurposeMax = 100

// TicketKeys implements proxy.TicketKeySource: the keys of set, newest first,
// at most keep of them. When the newest is older than rotate (or there is
// none) it first adds a fresh random key; rotate 0 never rotates. age is the
// newest key's age on the database's clock. Keys beyond keep are deleted.
// Instances asking at once create one key between them: the check and the
// insert run under a transaction-scoped advisory lock on the purpose.
func (k Keys) TicketKeys(ctx context.Context, set string, rotate time.Duration, keep int) (keys [][32]byte, age time.Duration, err error) {
	return k.keys(ctx, "tls-tickets/"+set, rotate, keep)
}

// QUICResetKey is the QUIC stateless reset key every instance uses, created
// by the first that asks.
func (k Keys) QUICResetKey(ctx context.Context) ([32]byte, error) {
	keys, _, err := k.keys(ctx, "quic-reset", 0, 1)
	if err != nil {
		return [32]byte{}, err
	}
	return keys[0], nil
}

func (k Keys) keys(ctx context.Context, purpose string, rotate time.Duration, keep int) ([][32]byte, time.Duration, error) {
	if purpose == "" || len(purpose) > keyPurposeMax || keep < 1 || keep > 100 || rotate < 0 {
		return nil, 0, fmt.Errorf("keys %q: bad arguments (keep %d, rotate %s)", purpose, keep, rotate)
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var keys [][32]byte
	var age time.Duration
	err := pgx.BeginFunc(ctx, k.db.pool, func(tx pgx.Tx) error {
		keys, age = nil, 0
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtextextended('tp_keys/' || $1, 0))", purpose); err != nil {
			return err
		}
		var fresh bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM tp_keys WHERE purpose = $1
			AND ($2::bigint = 0 OR created > clock_timestamp() - $2::bigint * interval '1 microsecond'))`,
			purpose, rotate.Microseconds()).Scan(&fresh); err != nil {
			return err
		}
		if !fresh {
			var b [32]byte
			if _, err := rand.Read(b[:]); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "INSERT INTO tp_keys (purpose, key) VALUES ($1, $2)", purpose, b[:]); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `DELETE FROM tp_keys WHERE purpose = $1 AND created NOT IN
			(SELECT created FROM tp_keys WHERE purpose = $1 ORDER BY created DESC LIMIT $2)`, purpose, keep); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT key, extract(epoch FROM clock_timestamp() - created)::float8
			FROM tp_keys WHERE purpose = $1 ORDER BY created DESC`, purpose)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var b []byte
			var secs float64
			if err := rows.Scan(&b, &secs); err != nil {
				return err
			}
			if len(b) != 32 {
				return errors.New("a key in tp_keys does not have 32 octets")
			}
			if len(keys) == 0 {
				age = time.Duration(secs * float64(time.Second))
			}
			keys = append(keys, [32]byte(b))
		}
		return rows.Err()
	})
	if err != nil {
		return nil, 0, fmt.Errorf("database: keys %s: %w", purpose, err)
	}
	return keys, age, nil
}
