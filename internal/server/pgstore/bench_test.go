package pgstore_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// How long a deny-list entry written on one instance takes to be reloaded by
// another (NOTIFY, the listener, the reload query), against the write alone
// as the baseline of the same run.
func BenchmarkDenyAdd(b *testing.B) {
	_, dsn := testpg.NewDatabase(b)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	open := func() *pgstore.DB {
		db, err := pgstore.Open(ctx, pgstore.Config{DSN: dsn, Password: testpg.Password})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(db.Close)
		return db
	}
	a, other := open(), open()
	seen := make(chan int, 1024) // entries the other instance holds after each reload
	other.OnChange(pgstore.TopicDeny, func(ctx context.Context) error {
		es, err := other.DenyEntries(ctx)
		if err != nil {
			return err
		}
		select {
		case seen <- len(es):
		default:
		}
		return nil
	})
	go other.Listen(ctx)
	deadline := time.Now().Add(30 * time.Second)
	for other.Health() != nil || len(seen) == 0 { // connected, first reload done
		if time.Now().After(deadline) {
			b.Fatal("the listener did not connect within 30s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	<-seen
	n := 0
	b.Run("write", func(b *testing.B) {
		for b.Loop() {
			n++
			if err := a.DenyAdd(pgstore.DenyEntry{Kind: "device", Value: "u@d" + strconv.Itoa(n)}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("seen-by-other", func(b *testing.B) {
		for b.Loop() {
			n++
			if err := a.DenyAdd(pgstore.DenyEntry{Kind: "device", Value: "u@d" + strconv.Itoa(n)}); err != nil {
				b.Fatal(err)
			}
			for have := 0; have < n; { // its reload that includes this entry
				select {
				case have = <-seen:
				case <-time.After(30 * time.Second):
					b.Fatal("the other instance did not reload within 30s")
				}
			}
		}
	})
}
