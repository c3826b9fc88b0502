package pgstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// channel is the one notification channel; the payload is a topic.
const channel = "tp_changes"

// Topics of notifications.
const (
	TopicUsers = "users"
	TopicDeny  = "deny"
)

// safetyReload is how often everything is reloaded even without a
// notification: only a net under LISTEN/NOTIFY, never what keeps instances in step.
const safetyReload = time.Minute

// OnChange registers reload to be called when topic changes on any instance,
// and after the listener reconnected (notifications may have been missed).
func (db *DB) OnChange(topic string, reload func(context.Context) error) {
	db.mu.Lock()
	defer db.mu.Unlock()
	db.reloaders[topic] = append(db.reloaders[topic], reload)
}

func notify(ctx context.Context, tx pgx.Tx, topic string) error {
	_, err := tx.Exec(ctx, "SELECT pg_notify($1, $2)", channel, topic)
	return err
}

// Listen keeps a connection that LISTENs for other instances' changes and
// reloads what they changed, until ctx ends. When the database is lost it says
// so once (Health, the log), retries with backoff, and on reconnecting reloads
// everything.
func (db *DB) Listen(ctx context.Context) {
	backoff := 250 * time.Millisecond
	first := true
	for ctx.Err() == nil {
		err := db.listenOnce(ctx, first)
		first = false
		if ctx.Err() != nil {
			return
		}
		if db.setHealth(fmt.Errorf("the database is unreachable (%v): changes made on other instances are not seen, and changes here (enroll, revoke) are refused until it is back", err)) {
			db.log.Error("lost the database; serving with what was last loaded, refusing changes until it is back", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (db *DB) listenOnce(ctx context.Context, first bool) error {
	cctx, cancel := context.WithTimeout(ctx, connectTimeout)
	conn, err := pgx.ConnectConfig(cctx, db.conn)
	cancel()
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+channel); err != nil {
		return err
	}
	// Whatever changed before LISTEN took effect is read now.
	if err := db.reloadAll(ctx); err != nil {
		return err
	}
	if db.setHealth(nil) && !first {
		db.log.Info("the database is back; reloaded users and the deny list")
	}
	for {
		wctx, cancel := context.WithTimeout(ctx, safetyReload)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, context.DeadlineExceeded):
			if err := db.reloadAll(ctx); err != nil {
				return err
			}
			continue
		case err != nil:
			return err
		}
		if err := db.reload(ctx, n.Payload); err != nil {
			return err
		}
	}
}

func (db *DB) reloadAll(ctx context.Context) error {
	db.mu.Lock()
	topics := make([]string, 0, len(db.reloaders))
	for t := range db.reloaders {
		topics = append(topics, t)
	}
	db.mu.Unlock()
	for _, t := range topics {
		if err := db.reload(ctx, t); err != nil {
			return err
		}
	}
	return nil
}

func (db *DB) reload(ctx context.Context, topic string) error {
	db.mu.Lock()
	fns := db.reloaders[topic]
	db.mu.Unlock()
	for _, fn := range fns {
		rctx, cancel := context.WithTimeout(ctx, opTimeout)
		err := fn(rctx)
		cancel()
		if err != nil {
			return fmt.Errorf("reload %s: %w", topic, err)
		}
	}
	return nil
}
