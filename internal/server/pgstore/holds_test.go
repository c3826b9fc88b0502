package pgstore_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
	"github.com/tp-proxy/tp/proxy/reverse"
)

// Claims judged by the database: another identity's claim of a held name is
// refused naming the holder and takes none of its keys; the same identity on
// another instance takes over with a higher epoch, after which the first
// instance's renewal and release no longer touch the row; a release keeps the
// name its owner's for the grace, refused to another identity until the
// grace ends; a claim notifies the other instances.
func TestHoldsClaimRenewRelease(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	db := open(t, dsn)
	a, b := pgstore.NewHolds(db, "A"), pgstore.NewHolds(db, "B")
	ctx := context.Background()
	const lease, hold = 10 * time.Second, time.Minute

	notified := make(chan struct{}, 10)
	db.OnChange(pgstore.TopicHolds, func(context.Context) error { notified <- struct{}{}; return nil })
	lctx, stop := context.WithCancel(ctx)
	defer stop()
	go db.Listen(lctx)
	<-notified // the listener's first load

	la, err := a.Claim(ctx, "alice-dev", []string{"web.rev", "tcp/2000"}, lease, hold)
	if err != nil || len(la) != 2 {
		t.Fatalf("alice's claim on A: %v %v", la, err)
	}
	select {
	case <-notified:
	case <-time.After(30 * time.Second):
		t.Fatal("a claim on A sent no notification to the listener")
	}
	_, err = b.Claim(ctx, "mallory-dev", []string{"other.rev", "web.rev"}, lease, hold)
	var he *reverse.HeldError
	if !errors.As(err, &he) || he.Key != "web.rev" || he.Owner != "alice-dev" || !he.Serving {
		t.Fatalf("mallory claiming alice's web.rev on B: %v; want a HeldError naming alice, serving", err)
	}
	if _, err := b.Claim(ctx, "bob-dev", []string{"other.rev"}, lease, hold); err != nil {
		t.Fatalf("other.rev after mallory's refused claim: %v; the refused claim must have taken nothing", err)
	}

	lb, err := b.Claim(ctx, "alice-dev", []string{"web.rev"}, lease, hold)
	if err != nil || len(lb) != 1 || lb[0].Epoch <= epochOf(la, "web.rev") {
		t.Fatalf("alice's takeover on B: %v %v; want an epoch above A's %d", lb, err, epochOf(la, "web.rev"))
	}
	kept, err := a.Renew(ctx, la, lease, hold)
	if err != nil || len(kept) != 1 || kept[0] != "tcp/2000" {
		t.Fatalf("A renewing after B took web.rev over: kept %v, %v; want tcp/2000 only", kept, err)
	}
	if err := a.Release(ctx, la, 0); err != nil {
		t.Fatal(err)
	}
	if kept, err := b.Renew(ctx, lb, lease, hold); err != nil || len(kept) != 1 {
		t.Fatalf("A's release at its stale epoch freed B's web.rev: B renews %v, %v", kept, err)
	}

	if err := b.Release(ctx, lb, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Claim(ctx, "mallory-dev", []string{"web.rev"}, lease, hold); !errors.As(err, &he) || he.Serving {
		t.Fatalf("mallory claiming web.rev within alice's grace: %v; want a HeldError, not serving", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := a.Claim(ctx, "mallory-dev", []string{"web.rev"}, lease, hold)
		if err == nil {
			break
		}
		if !errors.As(err, &he) || time.Now().After(deadline) {
			t.Fatalf("mallory claiming web.rev after alice's grace: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := a.Prune(ctx); err != nil {
		t.Fatal(err)
	}
}

func epochOf(ls []reverse.HoldLease, key string) int64 {
	for _, l := range ls {
		if l.Key == key {
			return l.Epoch
		}
	}
	return -1
}

// MaxPerOwner bounds an owner's keys over every instance: a claim on B that
// would exceed it counting A's keys is refused with a TooManyHeldError and
// takes none of its keys; the owner's own keys claimed again (an agent that
// moved) count once; claims racing on two instances never pass the bound.
func TestHoldsMaxPerOwnerAcrossInstances(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	a, b := pgstore.NewHolds(open(t, dsn), "A"), pgstore.NewHolds(open(t, dsn), "B")
	a.MaxPerOwner, b.MaxPerOwner = 3, 3
	ctx := context.Background()
	const lease, hold = 10 * time.Second, time.Minute

	if _, err := a.Claim(ctx, "alice-dev", []string{"one.rev", "two.rev"}, lease, hold); err != nil {
		t.Fatal(err)
	}
	_, err := b.Claim(ctx, "alice-dev", []string{"three.rev", "four.rev"}, lease, hold)
	var tm *reverse.TooManyHeldError
	if !errors.As(err, &tm) || tm.Held != 2 || tm.Asked != 2 || tm.Max != 3 || !strings.Contains(err.Error(), "max-reverse-names-per-identity") {
		t.Fatalf("alice's claim of two more on B: %v; want TooManyHeldError held 2, asked 2, max 3", err)
	}
	if _, err := b.Claim(ctx, "bob-dev", []string{"three.rev", "four.rev"}, lease, hold); err != nil {
		t.Fatalf("bob claiming the keys of alice's refused claim: %v; the refused claim must have taken nothing", err)
	}
	if _, err := b.Claim(ctx, "alice-dev", []string{"one.rev", "two.rev", "five.rev"}, lease, hold); err != nil {
		t.Fatalf("alice's agent moving to B with her two keys and one more (3, the bound): %v", err)
	}

	// Racing claims of one key each for carol on both instances.
	var wg sync.WaitGroup
	var mu sync.Mutex
	taken := 0
	for i := range 12 {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() {
			_, err := s.Claim(ctx, "carol-dev", []string{"c" + strconv.Itoa(i) + ".rev"}, lease, hold)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				taken++
			case !errors.As(err, new(*reverse.TooManyHeldError)):
				t.Errorf("carol's claim %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if taken != 3 {
		t.Fatalf("%d of carol's racing claims on two instances succeeded; want 3 (the bound)", taken)
	}
}
