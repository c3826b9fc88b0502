package pgstore

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// DenyEntry is one row of the deny list.
type DenyEntry struct {
	Kind   string // "user", "device" or "serial"
	Value  string // as tpd stores it (normalised)
	Since  time.Time
	Device string // for a serial: the device it was issued to
}

// DenyEntries reads the whole deny list.
func (db *DB) DenyEntries(ctx context.Context) ([]DenyEntry, error) {
	rows, _ := db.pool.Query(ctx, "SELECT kind, value, since, device FROM tp_denylist ORDER BY kind, value")
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (DenyEntry, error) {
		var e DenyEntry
		var since *time.Time
		if err := r.Scan(&e.Kind, &e.Value, &since, &e.Device); err != nil {
			return e, err
		}
		if since != nil {
			e.Since = since.UTC()
		}
		return e, nil
	})
	if err != nil {
		return nil, fmt.Errorf("read the deny list: %w", err)
	}
	return out, nil
}

// DenyAdd puts e on the list (keeping the first one's time if it is there
// already) and tells every instance.
func (db *DB) DenyAdd(e DenyEntry) error {
	err := db.tx(func(ctx context.Context, tx pgx.Tx) error {
		var since any
		if !e.Since.IsZero() {
			since = e.Since
		}
		if _, err := tx.Exec(ctx, "INSERT INTO tp_denylist (kind, value, since, device) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
			e.Kind, e.Value, since, e.Device); err != nil {
			return err
		}
		return notify(ctx, tx, TopicDeny)
	})
	if err != nil {
		return unreachable("revoke "+e.Kind+" "+e.Value, err)
	}
	return nil
}

// DenyRemove takes an entry off the list and tells every instance.
func (db *DB) DenyRemove(kind, value string) error {
	err := db.tx(func(ctx context.Context, tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "DELETE FROM tp_denylist WHERE kind = $1 AND value = $2", kind, value); err != nil {
			return err
		}
		return notify(ctx, tx, TopicDeny)
	})
	if err != nil {
		return unreachable("remove "+kind+" "+value+" from the deny list", err)
	}
	return nil
}
