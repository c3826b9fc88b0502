package proxy_test

import (
	"context"
	"crypto/tls"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/proxy"
)

// fixedKeys is a TicketKeySource that hands out the same two keys (newest
// first) with a fixed age of the newest, and records which sets were asked.
type fixedKeys struct {
	newest, older [32]byte
	age           time.Duration
	mu            sync.Mutex
	asked         []string
}

func (f *fixedKeys) TicketKeys(_ context.Context, set string, rotate time.Duration, keep int) ([][32]byte, time.Duration, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if rotate != 24*time.Hour || keep != 7 {
		return nil, 0, context.Canceled // the daily rotation, a week kept: anything else is a bug
	}
	f.asked = append(f.asked, set)
	return [][32]byte{f.newest, f.older}, f.age, nil
}

// With a key source, tickets are sealed with its keys: with the newest key once
// it is old enough that every instance has fetched it, with the one before while
// it is new (an instance that has not fetched it yet could not open tickets it
// sealed). The proxy and the website ask for their own sets.
func TestTicketKeysFromSource(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		age    time.Duration
		sealer string
	}{{time.Second, "older"}, {time.Hour, "newest"}} {
		src := &fixedKeys{age: tc.age}
		src.newest[0], src.older[0] = 1, 2
		e := newEnv(t, func(c *proxy.Config) { c.TicketKeys = src })
		cache := &ticketCache{inner: tls.NewLRUClientSessionCache(4)}
		cfg := e.clientTLS(nil)
		cfg.NextProtos = []string{"http/1.1"}
		cfg.ClientSessionCache = cache
		handshake(t, e.addr, cfg)
		ticket := cache.ticket()
		if ticket == nil {
			t.Fatal("the website issued no session ticket")
		}
		opens := func(k [32]byte) bool {
			c := &tls.Config{}
			c.SetSessionTicketKeys([][32]byte{k})
			ss, err := c.DecryptTicket(ticket, tls.ConnectionState{})
			return err == nil && ss != nil
		}
		got := map[bool]string{true: "newest", false: "older"}[opens(src.newest)]
		if opens(src.newest) == opens(src.older) || got != tc.sealer {
			t.Errorf("newest key %s old: ticket opens with newest %t, older %t; want only the %s", tc.age, opens(src.newest), opens(src.older), tc.sealer)
		}
		src.mu.Lock()
		asked := slices.Clone(src.asked)
		src.mu.Unlock()
		if !slices.Contains(asked, "proxy") || !slices.Contains(asked, "website") {
			t.Errorf("sets asked for: %v; want proxy and website", asked)
		}
	}
}
