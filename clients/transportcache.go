package clients

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/proxy/wire"
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
	Transport string    `json:"transport,omitempty"`
	Expires   time.Time `json:"expires"`
	// Discovery is the server's transport discovery document, fetched the first
	// time auto met the server (discovery.go); DiscoveryExpires ends its use.
	Discovery        *wire.Discovery `json:"discovery,omitempty"`
	DiscoveryExpires time.Time       `json:"discovery_expires,omitzero"`
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

// Discovery returns the remembered discovery document for server, when fresh.
func (c *TransportCache) Discovery(server string) (wire.Discovery, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.load()[server]
	if !ok || e.Discovery == nil || !c.now().Before(e.DiscoveryExpires) {
		return wire.Discovery{}, false
	}
	return *e.Discovery, true
}

// PutDiscovery remembers server's discovery document for the cache's TTL,
// beside the transport remembered for it.
func (c *TransportCache) PutDiscovery(server string, doc wire.Discovery) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.update(server, func(e *cacheEntry, now time.Time, ttl time.Duration) bool {
		e.Discovery, e.DiscoveryExpires = &doc, now.Add(ttl)
		return true
	})
}

// Put remembers that transport worked for server. Expired entries are dropped.
func (c *TransportCache) Put(server, transport string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.update(server, func(e *cacheEntry, now time.Time, ttl time.Duration) bool {
		// Rewrite only when the answer changes or half the entry's life has passed.
		if e.Transport == transport && e.Expires.Sub(now) > ttl/2 {
			return false
		}
		e.Transport, e.Expires = transport, now.Add(ttl)
		return true
	})
}

// update changes server's entry with change (which reports whether it changed
// anything) and writes the file, dropping expired entries. c.mu is held.
func (c *TransportCache) update(server string, change func(e *cacheEntry, now time.Time, ttl time.Duration) bool) error {
	ttl := c.TTL
	if ttl <= 0 {
		ttl = DefaultTransportCacheTTL
	}
	now := c.now()
	m := c.load()
	e := m[server]
	if !change(&e, now, ttl) {
		return nil
	}
	m[server] = e
	for k, old := range m {
		if old.Discovery != nil && !now.Before(old.DiscoveryExpires) {
			old.Discovery, old.DiscoveryExpires = nil, time.Time{}
			m[k] = old
		}
		if !now.Before(old.Expires) && old.Discovery == nil {
			delete(m, k)
		}
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(c.Path), 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return login.WriteFileAtomic(c.Path, append(b, '\n'), 0o600)
}
