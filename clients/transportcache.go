package clients

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/tp-proxy/tp/acme/login"
)

// transportCacheFile in $TP_HOME remembers which transport won the auto race.
const transportCacheFile = "transport-cache.json"

// DefaultTransportCacheTTL is how long an auto race result is trusted.
const DefaultTransportCacheTTL = time.Hour

// TransportCache remembers per server which transport worked, in a JSON file, so
// that on a network that blocks UDP only the first connection pays the race.
// Several processes may share the file: the last writer wins, which is harmless.
// A damaged or unwritable file only costs races.
type TransportCache struct {
	Path string
	// TTL is how long an entry holds; zero means DefaultTransportCacheTTL.
	TTL time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	mu sync.Mutex
}

type cacheEntry struct {
	Transport string    `json:"transport"`
	Expires   time.Time `json:"expires"`
}

// TransportCache returns the cache kept in this home directory.
func (h Home) TransportCache() *TransportCache {
	return &TransportCache{Path: filepath.Join(h.Dir, transportCacheFile)}
}

func (c *TransportCache) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

func (c *TransportCache) load() map[string]cacheEntry {
	m := map[string]cacheEntry{}
	b, err := os.ReadFile(c.Path)
	if err == nil {
		_ = json.Unmarshal(b, &m) // a damaged cache is an empty one
	}
	return m
}

// Get returns the remembered transport for server, or "" when none is fresh.
func (c *TransportCache) Get(server string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.load()[server]
	if !ok || !c.now().Before(e.Expires) {
		return ""
	}
	return e.Transport
}

// Put remembers that transport worked for server. Expired entries are dropped.
func (c *TransportCache) Put(server, transport string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	ttl := c.TTL
	if ttl <= 0 {
		ttl = DefaultTransportCacheTTL
	}
	now := c.now()
	m := c.load()
	// Rewrite only when the answer changes or half the entry's life has passed.
	if e, ok := m[server]; ok && e.Transport == transport && e.Expires.Sub(now) > ttl/2 {
		return nil
	}
	for k, e := range m {
		if !now.Before(e.Expires) {
			delete(m, k)
		}
	}
	m[server] = cacheEntry{Transport: transport, Expires: now.Add(ttl)}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(c.Path), 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return login.WriteFileAtomic(c.Path, append(b, '\n'), 0o600)
}
