package pgstore_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// What an instance reads of the others for peering: the route of a name
// (cached, a "no route" answer too, until Invalidate), the public exposures
// other instances serve (not its own), the instances that serve a device's
// names (one per instance, reverse names only), and an instance's peer
// address.
func TestPeerLookups(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	db := open(t, dsn)
	ctx := context.Background()
	for _, i := range []pgstore.Instance{{Name: "A", PeerAddress: "10.0.0.1:443"}, {Name: "B", PeerAddress: "10.0.0.2:443"}} {
		if err := db.Heartbeat(ctx, i); err != nil {
			t.Fatal(err)
		}
	}
	routes := pgstore.NewRoutes(db)
	if _, ok, err := routes.Route(ctx, "web.rev"); ok || err != nil {
		t.Fatalf("route of a name nobody holds: %v %v", ok, err)
	}
	a := pgstore.NewHolds(db, "A")
	if _, err := a.Claim(ctx, "alice-dev", []string{"web.rev", "tcp/2000", "udp/2001", "sni/blog.example.org"}, 10*time.Second, time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := routes.Route(ctx, "web.rev"); ok {
		t.Fatal("the cached answer (no route) changed before Invalidate: it was not cached")
	}
	routes.Invalidate()
	rt, ok, err := routes.Route(ctx, "web.rev")
	if err != nil || !ok || rt.Instance != "A" || rt.Addr != "10.0.0.1:443" || rt.Epoch < 1 {
		t.Fatalf("route of web.rev after Invalidate: %+v %v %v", rt, ok, err)
	}

	pub, err := db.PeerPublic(ctx, "B")
	want := []pgstore.PeerExposure{{"sni/blog.example.org", "10.0.0.1:443"}, {"tcp/2000", "10.0.0.1:443"}, {"udp/2001", "10.0.0.1:443"}}
	if err != nil || !slices.Equal(pub, want) {
		t.Fatalf("public exposures other instances serve, seen from B: %q %v", pub, err)
	}
	if own, err := db.PeerPublic(ctx, "A"); err != nil || len(own) != 0 {
		t.Fatalf("public exposures other instances serve, seen from A (it serves them itself): %q %v", own, err)
	}
	ar, err := db.AgentRoutes(ctx, "B", "alice-dev")
	if err != nil || len(ar) != 1 || ar[0].Instance != "A" || ar[0].Key != "web.rev" || ar[0].Addr != "10.0.0.1:443" {
		t.Fatalf("instances serving alice's device, seen from B: %+v %v; want A with web.rev", ar, err)
	}
	if ar, err := db.AgentRoutes(ctx, "B", "bob-dev"); err != nil || len(ar) != 0 {
		t.Fatalf("instances serving bob's device (none): %+v %v", ar, err)
	}
	if addr, err := db.InstanceAddr(ctx, "B"); err != nil || addr != "10.0.0.2:443" {
		t.Fatalf("B's peer address: %q %v", addr, err)
	}
	if addr, err := db.InstanceAddr(ctx, "gone"); err != nil || addr != "" {
		t.Fatalf("the peer address of an instance with no row: %q %v; want none", addr, err)
	}
}
