package tpd

import (
	"container/list"
	"encoding/json"
	"fmt"
	"html"
	"math"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/acme/login"
)

// maxRateSources bounds the source addresses (and maxRateDevices the devices) a
// limiter remembers. When it is full the least recently seen is forgotten: its
// bucket starts full again if it comes back, which costs at most one burst per
// eviction, and the CA's own bounds (in-memory nonces, pruning) hold whatever
// gets through.
const (
	maxRateSources = 16384
	maxRateDevices = 16384
)

// An enrolled device may mint ACME account bindings (one per login, one per
// reverse name and renewal) at this rate, after a burst: each is a database
// record until pruned, and the per-source limit alone would let one device with
// many addresses mint without bound.
const (
	bindingRate  = 1.0 / 10 // per second: 360 an hour
	bindingBurst = 100
)

// keyedLimiter is a token bucket per key, with a bounded table of keys.
type keyedLimiter[K comparable] struct {
	rate  float64 // tokens per second
	burst float64
	max   int
	now   func() time.Time

	mu   sync.Mutex
	lru  *list.List // of *bucket[K], most recently seen at the front
	keys map[K]*list.Element
}

type bucket[K comparable] struct {
	key    K
	tokens float64
	last   time.Time
}

func newKeyedLimiter[K comparable](rate float64, burst, max int) *keyedLimiter[K] {
	return &keyedLimiter[K]{rate: rate, burst: float64(burst), max: max, now: time.Now,
		lru: list.New(), keys: map[K]*list.Element{}}
}

// allow takes a token for k; when there is none it says how long until one.
func (l *keyedLimiter[K]) allow(k K) (ok bool, wait time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	var b *bucket[K]
	if el, found := l.keys[k]; found {
		l.lru.MoveToFront(el)
		b = el.Value.(*bucket[K])
		b.tokens = math.Min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
		b.last = now
	} else {
		if l.lru.Len() >= l.max {
			oldest := l.lru.Back()
			l.lru.Remove(oldest)
			delete(l.keys, oldest.Value.(*bucket[K]).key)
		}
		b = &bucket[K]{key: k, tokens: l.burst, last: now}
		l.keys[k] = l.lru.PushFront(b)
	}
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) / l.rate * float64(time.Second))
}

func (l *keyedLimiter[K]) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}

// sourceLimiter limits the endpoints anyone can reach without a client
// certificate (the CA's ACME API and enrollment) per source address. IPv4
// sources are keyed by address, IPv6 ones by /64, the smallest block a client
// usually gets (sourceKey).
type sourceLimiter = keyedLimiter[netip.Addr]

func newSourceLimiter(rate float64, burst int) *sourceLimiter {
	return newKeyedLimiter[netip.Addr](rate, burst, maxRateSources)
}

func sourceKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.Addr()
	}
	return a
}

// limitSources refuses requests over l's limit with 429 and Retry-After, in the
// format the endpoint's clients read: an ACME problem document under /acme/,
// TP's JSON error elsewhere.
func limitSources(l *sourceLimiter, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		src, err := remoteAddr(r)
		if err != nil {
			http.Error(w, "cannot tell the source address of this request", http.StatusBadRequest)
			return
		}
		ok, wait := l.allow(sourceKey(src))
		if ok {
			h.ServeHTTP(w, r)
			return
		}
		secs := int(math.Ceil(wait.Seconds()))
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		msg := fmt.Sprintf("too many requests from %s to tpd's login and certificate endpoints; try again in %d s", src.Unmap(), secs)
		if strings.HasPrefix(r.URL.Path, "/acme/") {
			acme.WriteProblem(w, http.StatusTooManyRequests, "rateLimited", msg)
			return
		}
		if strings.HasPrefix(r.URL.Path, login.PathGrantPage+"/") { // a person's browser
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			w.Header().Set("Cache-Control", "no-store")
			w.Header().Set("Content-Security-Policy", "default-src 'none'")
			w.WriteHeader(http.StatusTooManyRequests)
			fmt.Fprintf(w, "<!doctype html><title>TP: too many requests</title><h1>Too many requests</h1><p>%s.</p>\n",
				html.EscapeString(fmt.Sprintf("Too many requests from %s to this TP server's sign-in pages; try again in %d s", src.Unmap(), secs)))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusTooManyRequests)
		_ = json.NewEncoder(w).Encode(login.ErrorResponse{Error: msg})
	})
}

func remoteAddr(r *http.Request) (netip.Addr, error) {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	return netip.ParseAddr(host)
}
