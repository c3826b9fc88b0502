package pgstore

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"time"

	"github.com/tp-proxy/tp/acme"
)

// nonceBytes is a nonce's entropy; base64url of 16 bytes is 22 characters.
const nonceBytes = 16

// Nonces keeps the embedded CA's ACME replay nonces in the database, so that a
// nonce handed out by one instance is accepted, once, by any other. It
// implements acme.NonceStore. PruneNonces bounds the table.
type Nonces struct{ db *DB }

var _ acme.NonceStore = Nonces{}

// NewNonces is the nonce store on db.
func NewNonces(db *DB) Nonces { return Nonces{db} }

// Create implements acme.NonceStore.
func (n Nonces) Create(ctx context.Context) (string, error) {
	b := make([]byte, nonceBytes)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	id := base64.RawURLEncoding.EncodeToString(b)
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	if _, err := n.db.pool.Exec(ctx, "INSERT INTO tp_acme_nonces (id, expires) VALUES ($1, now() + $2 * interval '1 microsecond')",
		id, acme.NonceTTL.Microseconds()); err != nil {
		return "", fmt.Errorf("store an ACME nonce in the database: %w", err)
	}
	return id, nil
}

// Use implements acme.NonceStore: the row is deleted by the statement that
// checks it, so a nonce is used once whichever instances are asked.
func (n Nonces) Use(ctx context.Context, nonce string) (bool, error) {
	if base64.RawURLEncoding.DecodedLen(len(nonce)) != nonceBytes {
		return false, nil
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	tag, err := n.db.pool.Exec(ctx, "DELETE FROM tp_acme_nonces WHERE id = $1 AND expires > now()", nonce)
	if err != nil {
		return false, fmt.Errorf("check an ACME nonce in the database: %w", err)
	}
	return tag.RowsAffected() == 1, nil
}

// Len implements acme.NonceStore.
func (n Nonces) Len() int {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var c int
	if err := n.db.pool.QueryRow(ctx, "SELECT count(*) FROM tp_acme_nonces WHERE expires > now()").Scan(&c); err != nil {
		return 0
	}
	return c
}

// PruneNonces deletes expired nonces and, past max, the oldest (as the
// in-memory store does), and says how many went.
func (n Nonces) PruneNonces(ctx context.Context, max int) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	tag, err := n.db.pool.Exec(ctx, "DELETE FROM tp_acme_nonces WHERE expires <= now()")
	if err != nil {
		return 0, err
	}
	over, err := n.db.pool.Exec(ctx, `DELETE FROM tp_acme_nonces WHERE id IN
		(SELECT id FROM tp_acme_nonces ORDER BY expires DESC OFFSET $1)`, max)
	if err != nil {
		return tag.RowsAffected(), err
	}
	return tag.RowsAffected() + over.RowsAffected(), nil
}
