package pgstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// A claim records whether its names are open to enrolled devices only, and
// the route other instances read carries it: a reverse HTTP name exposed with
// --devices-only on a/1 routes as devices-only; the same owner's later claim
// of it for anyone (its exposer restarted without the flag) routes as open
// once the cache is invalidated (the holds notification of that claim), and an
// agent's ordinary claim of other names is never devices-only.
func TestRouteCarriesDevicesOnly(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	db := open(t, dsn)
	ctx := context.Background()
	if err := db.Heartbeat(ctx, pgstore.Instance{Name: "a/1", PeerAddress: "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	h := pgstore.NewHolds(db, "a/1")
	if _, err := h.ClaimAccess(ctx, "alice-dev", []string{"private.rev"}, true, time.Minute, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Claim(ctx, "bob-dev", []string{"web.rev"}, time.Minute, time.Hour); err != nil {
		t.Fatal(err)
	}
	routes := pgstore.NewRoutes(db)
	if rt, ok, err := routes.Route(ctx, "private.rev"); err != nil || !ok || !rt.DevicesOnly || rt.Instance != "a/1" {
		t.Fatalf("route to private.rev claimed devices-only: %+v %v %v; want a/1, devices only", rt, ok, err)
	}
	if rt, ok, err := routes.Route(ctx, "web.rev"); err != nil || !ok || rt.DevicesOnly {
		t.Fatalf("route to web.rev claimed by an ordinary claim: %+v %v %v; want open to anyone", rt, ok, err)
	}
	if _, err := h.Claim(ctx, "alice-dev", []string{"private.rev"}, time.Minute, time.Hour); err != nil {
		t.Fatal(err)
	}
	routes.Invalidate()
	if rt, ok, err := routes.Route(ctx, "private.rev"); err != nil || !ok || rt.DevicesOnly || rt.Epoch != 2 {
		t.Fatalf("route to private.rev claimed again for anyone: %+v %v %v; want epoch 2, open to anyone", rt, ok, err)
	}
}
