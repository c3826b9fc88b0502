package pgstore_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// TestKeysShared: two instances on one database asking at once get one reset
// key and one ticket key between them; a set rotates when its newest key is
// older than the rotation, keeps at most keep keys, newest first; sets do
// not share keys.
func TestKeysShared(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	ctx := context.Background()
	a := pgstore.NewKeys(open(t, dsn))
	b := pgstore.NewKeys(open(t, dsn))

	var wg sync.WaitGroup
	var ra, rb [32]byte
	var ta, tb [][32]byte
	var errs [4]error
	wg.Add(2)
	go func() {
		defer wg.Done()
		ra, errs[0] = a.QUICResetKey(ctx)
		ta, _, errs[1] = a.TicketKeys(ctx, "proxy", time.Hour, 3)
	}()
	go func() {
		defer wg.Done()
		rb, errs[2] = b.QUICResetKey(ctx)
		tb, _, errs[3] = b.TicketKeys(ctx, "proxy", time.Hour, 3)
	}()
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if ra != rb || ra == ([32]byte{}) {
		t.Fatalf("reset keys differ between instances (or are zero): %x, %x", ra[:4], rb[:4])
	}
	if len(ta) != 1 || len(tb) != 1 || ta[0] != tb[0] {
		t.Fatalf("ticket keys asked at once: %d and %d keys, equal %t; want one shared key", len(ta), len(tb), len(ta) == 1 && len(tb) == 1 && ta[0] == tb[0])
	}
	web, _, err := a.TicketKeys(ctx, "website", time.Hour, 3)
	if err != nil {
		t.Fatal(err)
	}
	if web[0] == ta[0] {
		t.Fatal("the website's ticket key is the proxy's")
	}
	again, age, err := b.TicketKeys(ctx, "proxy", time.Hour, 3)
	if err != nil || len(again) != 1 || again[0] != ta[0] || age < 0 || age > time.Hour {
		t.Fatalf("within the rotation: %d keys, age %s, %v; want the same one key", len(again), age, err)
	}
	// A rotation of 1µs has passed by the next call: each call adds a key, and
	// the oldest go past keep.
	var last [][32]byte
	for i := range 5 {
		if last, age, err = a.TicketKeys(ctx, "proxy", time.Microsecond, 3); err != nil {
			t.Fatal(err)
		}
		if want := min(i+2, 3); len(last) != want {
			t.Fatalf("after %d rotations: %d keys, want %d", i+1, len(last), want)
		}
	}
	if last[0] == ta[0] || last[1] == ta[0] || last[2] == ta[0] {
		t.Fatal("the first key is still kept after 5 rotations with keep 3")
	}
	fromB, _, err := b.TicketKeys(ctx, "proxy", time.Hour, 3)
	if err != nil || len(fromB) != 3 || fromB[0] != last[0] || fromB[2] != last[2] {
		t.Fatalf("B sees %d keys (%v), want A's 3 newest first", len(fromB), err)
	}
	if r, _ := b.QUICResetKey(ctx); r != ra {
		t.Fatal("the reset key changed")
	}
}
