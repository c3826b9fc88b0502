package pgstore

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/acme"
)

// TXT keeps the dns-01 answers that reverse-name owners publish in the
// database, so that the CA of any instance finds an answer published through
// another: with a balancer in front, an agent's reverse-challenge request and
// its ACME answer to the challenge may land on different instances, and with
// answers in one instance's memory the authorization stayed pending. It
// implements acme.TXTStore with the in-memory store's bounds and lifetime,
// on the database's clock.
type TXT struct{ db *DB }

var _ acme.TXTStore = TXT{}

// NewTXT is the challenge-answer store on db.
func NewTXT(db *DB) TXT { return TXT{db} }

// Publish implements acme.TXTStore. Writers take turns (a transaction-scoped
// advisory lock), so the bounds hold across instances; each publish first
// deletes the expired answers, which keeps the table within acme.MaxTXT rows.
func (s TXT) Publish(ctx context.Context, host, value string) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	ttl := acme.TXTTTL.Microseconds()
	return pgx.BeginFunc(ctx, s.db.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtextextended('tp_acme_txt', 0))"); err != nil {
			return fmt.Errorf("store a challenge answer in the database: %w", err)
		}
		if _, err := tx.Exec(ctx, "DELETE FROM tp_acme_txt WHERE expires <= now()"); err != nil {
			return fmt.Errorf("store a challenge answer in the database: %w", err)
		}
		tag, err := tx.Exec(ctx, "UPDATE tp_acme_txt SET expires = now() + $3 * interval '1 microsecond' WHERE host = $1 AND value = $2", host, value, ttl)
		if err != nil {
			return fmt.Errorf("store a challenge answer in the database: %w", err)
		}
		if tag.RowsAffected() == 1 {
			return nil // the same answer again refreshes it
		}
		var forHost, all int
		if err := tx.QueryRow(ctx, "SELECT count(*) FILTER (WHERE host = $1), count(*) FROM tp_acme_txt", host).Scan(&forHost, &all); err != nil {
			return fmt.Errorf("store a challenge answer in the database: %w", err)
		}
		switch {
		case all >= acme.MaxTXT:
			return acme.TXTFullError("")
		case forHost >= acme.MaxTXTPerName:
			return acme.TXTFullError(host)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO tp_acme_txt (host, value, expires) VALUES ($1, $2, now() + $3 * interval '1 microsecond')", host, value, ttl); err != nil {
			return fmt.Errorf("store a challenge answer in the database: %w", err)
		}
		return nil
	})
}

// Lookup implements acme.TXTStore.
func (s TXT) Lookup(ctx context.Context, host string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	rows, err := s.db.pool.Query(ctx, "SELECT value FROM tp_acme_txt WHERE host = $1 AND expires > now()", host)
	if err != nil {
		return nil, fmt.Errorf("read the challenge answers from the database: %w", err)
	}
	vs, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("read the challenge answers from the database: %w", err)
	}
	return vs, nil
}
