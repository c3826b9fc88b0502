package pgstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// The instances' rows as `tpd status` reads them: both listed by name with
// their peer address, revision, whether they drain, and a heartbeat age on
// the database's clock; a route to a name served by an instance that drains
// is not given (its agents are moving), and is again once it serves.
func TestInstancesAndDrainingRoutes(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	db := open(t, dsn)
	ctx := context.Background()
	for _, in := range []pgstore.Instance{{Name: "a/1", PeerAddress: "127.0.0.1:1", PolicyRevision: "r1"}, {Name: "b/2", PeerAddress: "127.0.0.1:2", PolicyRevision: "r1", Draining: true}} {
		if err := db.Heartbeat(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	got, err := db.Instances(ctx, 0)
	if err != nil || len(got) != 2 {
		t.Fatalf("Instances: %+v %v; want both", got, err)
	}
	if a, b := got[0], got[1]; a.Name != "a/1" || a.PeerAddress != "127.0.0.1:1" || a.PolicyRevision != "r1" || a.Draining ||
		b.Name != "b/2" || !b.Draining || a.Age < 0 || a.Age > time.Minute || b.Age < 0 {
		t.Fatalf("Instances: %+v", got)
	}

	if _, err := pgstore.NewHolds(db, "b/2").Claim(ctx, "alice-dev", []string{"web.rev"}, time.Minute, time.Hour); err != nil {
		t.Fatal(err)
	}
	routes := pgstore.NewRoutes(db)
	if rt, ok, err := routes.Route(ctx, "web.rev"); err != nil || ok {
		t.Fatalf("route to web.rev served by b/2 while it drains: %+v %v %v; want none", rt, ok, err)
	}
	if err := db.Heartbeat(ctx, pgstore.Instance{Name: "b/2", PeerAddress: "127.0.0.1:2", PolicyRevision: "r1"}); err != nil {
		t.Fatal(err)
	}
	// A fresh lookup: a cache of "no route" lasts until a holds notification.
	if rt, ok, err := pgstore.NewRoutes(db).Route(ctx, "web.rev"); err != nil || !ok || rt.Instance != "b/2" || rt.Addr != "127.0.0.1:2" {
		t.Fatalf("route to web.rev served by b/2: %+v %v %v", rt, ok, err)
	}
}
