package tpd

import (
	"container/list"
	"encoding/json"
	"fmt"
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

// maxRateSources bounds the source addresses the limiter remembers. When it is
// full the least recently seen source is forgotten: its bucket starts full again
// if it comes back, which costs at most one burst per eviction, and the CA's own
// bounds (in-memory nonces, pruning) hold whatever gets through.
const maxRateSources = 16384

// sourceLimiter is a token bucket per source address for the endpoints anyone
// can reach without a client certificate (the CA's ACME API and enrollment).
// IPv4 sources are keyed by address, IPv6 ones by /64, the smallest block a
// client usually gets.
type sourceLimiter struct {
	rate  float64 // tokens per second
	burst float64
	max   int
	now   func() time.Time

	mu      sync.Mutex
	lru     *list.List // of *bucket, most recently seen at the front
	sources map[netip.Addr]*list.Element
}

type bucket struct {
	src    netip.Addr
	tokens float64
	last   time.Time
}

func newSourceLimiter(rate float64, burst int) *sourceLimiter {
	return &sourceLimiter{rate: rate, burst: float64(burst), max: maxRateSources, now: time.Now,
		lru: list.New(), sources: map[netip.Addr]*list.Element{}}
}

// allow takes a token for src; when there is none it says how long until one.
func (l *sourceLimiter) allow(src netip.Addr) (ok bool, wait time.Duration) {
	src = sourceKey(src)
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	var b *bucket
	if el, found := l.sources[src]; found {
		l.lru.MoveToFront(el)
		b = el.Value.(*bucket)
		b.tokens = math.Min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
		b.last = now
	} else {
		if l.lru.Len() >= l.max {
			oldest := l.lru.Back()
			l.lru.Remove(oldest)
			delete(l.sources, oldest.Value.(*bucket).src)
		}
		b = &bucket{src: src, tokens: l.burst, last: now}
		l.sources[src] = l.lru.PushFront(b)
	}
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) / l.rate * float64(time.Second))
}

func (l *sourceLimiter) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}

func sourceKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.Addr()
	}
	return a
}

// wrap refuses requests over the limit with 429 and Retry-After, in the format
// the endpoint's clients read: an ACME problem document under /acme/, TP's JSON
// error elsewhere.
func (l *sourceLimiter) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		src, err := remoteAddr(r)
		if err != nil {
			http.Error(w, "cannot tell the source address of this request", http.StatusBadRequest)
			return
		}
		ok, wait := l.allow(src)
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
