package transport_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients/transport"
)

// The auto transport's cache holds a result for one hour, on the cache's own
// clock: an hour after the race it is forgotten (the next dial races again), a
// second before it is still used, and a repeated success renews it only once half
// its life has passed. Bad input: none; the clock is moved by hand.
func TestTransportCacheExpiresAfterAnHour(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "transport-cache.json")
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	now := t0
	clock := func() time.Time { return now }
	cache := &transport.Cache{Path: path, Now: clock}
	other := &transport.Cache{Path: path, Now: clock} // another process on the same file
	const server = "tp.example.org:443"

	if got := cache.Get(server); got != "" {
		t.Fatalf("empty cache says %q", got)
	}
	if err := cache.Put(server, transport.TLS); err != nil {
		t.Fatal(err)
	}
	now = t0.Add(time.Hour - time.Second)
	if got := other.Get(server); got != transport.TLS {
		t.Fatalf("59m59s after the race the cache says %q, want tls", got)
	}
	now = t0.Add(time.Hour)
	if got := other.Get(server); got != "" {
		t.Fatalf("an hour after the race the cache still says %q; want it forgotten", got)
	}

	// A success within the first half-life does not extend the entry...
	now = t0
	if err := cache.Put(server, transport.TLS); err != nil {
		t.Fatal(err)
	}
	now = t0.Add(10 * time.Minute)
	if err := cache.Put(server, transport.TLS); err != nil {
		t.Fatal(err)
	}
	now = t0.Add(time.Hour)
	if got := cache.Get(server); got != "" {
		t.Fatalf("a repeat 10 minutes in extended the entry: %q an hour after the first race", got)
	}
	// ...one after it does, by a full hour from then.
	now = t0
	if err := cache.Put(server, "quic"); err != nil { // a changed answer is written at once
		t.Fatal(err)
	}
	if got := cache.Get(server); got != transport.QUIC {
		t.Fatalf("after a changed answer the cache says %q, want quic", got)
	}
	now = t0.Add(31 * time.Minute)
	if err := cache.Put(server, transport.QUIC); err != nil {
		t.Fatal(err)
	}
	now = t0.Add(31*time.Minute + time.Hour - time.Second)
	if got := cache.Get(server); got != transport.QUIC {
		t.Fatalf("a repeat 31 minutes in did not renew the entry: %q", got)
	}

	// Expired entries of other servers are dropped when the file is written.
	now = t0.Add(5 * time.Hour)
	if err := cache.Put("other.example.org:443", transport.TLS); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var entries map[string]json.RawMessage
	if err := json.Unmarshal(b, &entries); err != nil {
		t.Fatal(err)
	}
	if _, ok := entries[server]; ok || len(entries) != 1 {
		t.Fatalf("expired entries kept in the file:\n%s", b)
	}
}

// TTL overrides the hour.
func TestTransportCacheTTL(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	now := t0
	cache := &transport.Cache{Path: filepath.Join(t.TempDir(), "c.json"), TTL: 5 * time.Minute, Now: func() time.Time { return now }}
	if err := cache.Put("s:1", transport.TLS); err != nil {
		t.Fatal(err)
	}
	now = t0.Add(5*time.Minute - time.Nanosecond)
	if got := cache.Get("s:1"); got != transport.TLS {
		t.Fatalf("within the TTL: %q", got)
	}
	now = t0.Add(5 * time.Minute)
	if got := cache.Get("s:1"); got != "" {
		t.Fatalf("after the TTL: %q", got)
	}
}
