package policy

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestCacheBounds: 100,000 distinct inputs, keyed as the default policy reads
// them, never make the cache hold more than CacheEntries, and an entry is not
// used once CacheTTL has passed.
func TestCacheBounds(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, DefaultFile), []byte(DefaultPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	e, err := Load(context.Background(), dir, WithTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	c := e.current.Load()
	if c.cache == nil {
		t.Fatalf("the default policy is not cached: %s", c.use.why)
	}
	now := time.Unix(1_800_000_000, 0)
	c.cache.now = func() time.Time { return now }
	keys := map[string]bool{}
	for i := range 100_000 {
		in := map[string]any{
			"action": "dial",
			"identity": map[string]any{"user": "u", "device": "d", "device_id": "u@d", "groups": []any{},
				"serial": "1f", "expiry": "2030-01-01T00:00:00Z"},
			"destination": map[string]any{"host": fmt.Sprintf("h%d.example", i), "port": 22, "network": "tcp", "ips": []any{}, "embedded_ipv4": []any{}},
			"source":      map[string]any{"address": "192.0.2.1:1", "transport": "quic"},
			"time":        "2030-01-01T00:00:00Z",
		}
		k, ok := c.use.key(in)
		if !ok {
			t.Fatalf("input %d has no key", i)
		}
		keys[k] = true
		c.cache.put(k, Result{Allow: i%2 == 0, Revision: c.revision})
		if n := c.cache.len(); n > CacheEntries {
			t.Fatalf("after %d inputs the cache holds %d entries, more than %d", i+1, n, CacheEntries)
		}
	}
	if len(keys) != 100_000 {
		t.Fatalf("100,000 distinct inputs made %d distinct keys", len(keys))
	}
	c.cache.put("k", Result{Allow: true})
	if _, hit := c.cache.get("k"); !hit {
		t.Fatal("a fresh entry was not found")
	}
	now = now.Add(CacheTTL)
	if r, hit := c.cache.get("k"); hit {
		t.Fatalf("an entry %s old was used: %+v", CacheTTL, r)
	}
}
