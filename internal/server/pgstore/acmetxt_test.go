package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// A challenge answer published through one instance is what another's CA
// finds; an expired one is not. Bad input: the same answer replayed (stored
// once), then more answers for one name than its bound, written by two
// instances at once: exactly acme.MaxTXTPerName are kept and the rest are
// refused with acme.ErrTXTFull naming the name, while another name is not
// blocked.
func TestTXTAcrossInstances(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	db := open(t, dsn)
	a, b := pgstore.NewTXT(db), pgstore.NewTXT(open(t, dsn))
	ctx := context.Background()
	const host = "_acme-challenge.files.rev.tp.internal"
	for range 3 {
		if err := a.Publish(ctx, host, "answer"); err != nil {
			t.Fatalf("publish on A: %v", err)
		}
	}
	got, err := b.Lookup(ctx, host)
	if err != nil || !slices.Equal(got, []string{"answer"}) {
		t.Fatalf("lookup on B of the answer published three times on A: %q, %v; want it once", got, err)
	}
	if _, err := db.Pool().Exec(ctx, "UPDATE tp_acme_txt SET expires = now() - interval '1 second'"); err != nil {
		t.Fatal(err)
	}
	if got, err := b.Lookup(ctx, host); err != nil || len(got) != 0 {
		t.Fatalf("lookup of an answer that expired a second ago: %q, %v; want none", got, err)
	}

	var mu sync.Mutex
	var full []error
	var wg sync.WaitGroup
	for i := range 2 * acme.MaxTXTPerName {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() {
			if err := s.Publish(ctx, host, fmt.Sprint("v", i)); err != nil {
				mu.Lock()
				full = append(full, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(full) != acme.MaxTXTPerName {
		t.Fatalf("%d of %d answers for one name refused; want %d: %v", len(full), 2*acme.MaxTXTPerName, acme.MaxTXTPerName, full)
	}
	for _, err := range full {
		if !errors.Is(err, acme.ErrTXTFull) || !strings.Contains(err.Error(), "files.rev.tp.internal") {
			t.Fatalf("refusal %q; want ErrTXTFull naming files.rev.tp.internal", err)
		}
	}
	if got, _ := a.Lookup(ctx, host); len(got) != acme.MaxTXTPerName {
		t.Fatalf("%d answers stored for one name; want %d", len(got), acme.MaxTXTPerName)
	}
	if err := b.Publish(ctx, "_acme-challenge.other.rev.tp.internal", "x"); err != nil {
		t.Fatalf("another name is blocked: %v", err)
	}
}
