package transport

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/proxy/wire"
)

// DefaultCacheTTL is how long an auto race result is trusted.
const DefaultCacheTTL = time.Hour

// DefaultFallbackTTL is how long a fallback (a carrier other than UDP, or the
// plain TLS transport) is remembered: after it, the next connection on that
// network races UDP again, so a network that stopped blocking UDP gets QUIC
// over UDP back (a live connection also probes UDP: Dialer.UDPReprobe).
const DefaultFallbackTTL = 10 * time.Minute

// Cache remembers, per server and network (NetworkID), which
// transport and carrier worked, in a JSON file, so that on a network that
// blocks UDP only the first connection pays the race, and a laptop that moves
// from that network to one that passes UDP races afresh there.
// Several processes may share the file: the last writer wins, which is harmless.
// A damaged or unwritable file only costs races.
type Cache struct {
	Path string
	// TTL is how long an entry holds; zero means DefaultCacheTTL.
	TTL time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Network names the network a server is reached through; nil means
	// NetworkID. Entries are kept per server and network.
	Network func(server string) string

	mu sync.Mutex
}

type cacheEntry struct {
	Transport string    `json:"transport,omitempty"`
	Expires   time.Time `json:"expires"`
	// Discovery is the server's transport discovery document, fetched the first
	// time auto met the server (client_discovery.go); DiscoveryExpires ends its use.
	Discovery        *wire.Discovery `json:"discovery,omitempty"`
	DiscoveryExpires time.Time       `json:"discovery_expires,omitzero"`
}

func (c *Cache) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

func (c *Cache) load() map[string]cacheEntry {
	m := map[string]cacheEntry{}
	b, err := os.ReadFile(c.Path)
	if err == nil {
		_ = json.Unmarshal(b, &m) // a damaged cache is an empty one
	}
	return m
}

// key is server's entry on the network the host is on now.
func (c *Cache) key(server string) string {
	network := c.Network
	if network == nil {
		network = NetworkID
	}
	id := network(strings.TrimPrefix(server, CarrierKeyPrefix))
	if id == "" {
		return server
	}
	return server + " on " + id
}

// CarrierKeyPrefix marks the entries of the carrier that worked (beside the
// transport's, under the server's name alone).
const CarrierKeyPrefix = "carrier:"

// Get returns the remembered transport for server on the current network, or
// "" when none is fresh.
func (c *Cache) Get(server string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.load()[c.key(server)]
	if !ok || !c.now().Before(e.Expires) {
		return ""
	}
	return e.Transport
}

// Discovery returns the remembered discovery document for server, when fresh.
func (c *Cache) Discovery(server string) (wire.Discovery, bool) {
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
func (c *Cache) PutDiscovery(server string, doc wire.Discovery) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.update(server, func(e *cacheEntry, now time.Time, ttl time.Duration) bool {
		e.Discovery, e.DiscoveryExpires = &doc, now.Add(ttl)
		return true
	})
}

// Put remembers that transport worked for server on the current network.
// Expired entries are dropped.
func (c *Cache) Put(server, transport string) error {
	return c.PutFor(server, transport, 0)
}

// PutFor is Put for ttl (zero: the cache's TTL), capped at the cache's TTL.
func (c *Cache) PutFor(server, transport string, ttl time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.update(c.key(server), func(e *cacheEntry, now time.Time, cttl time.Duration) bool {
		if ttl <= 0 || ttl > cttl {
			ttl = cttl
		}
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
func (c *Cache) update(server string, change func(e *cacheEntry, now time.Time, ttl time.Duration) bool) error {
	ttl := c.TTL
	if ttl <= 0 {
		ttl = DefaultCacheTTL
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
