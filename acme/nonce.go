package acme

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"sync"
	"time"

	stepacme "github.com/smallstep/certificates/acme"
)

// ACME replay nonces live in memory, not in the CA database. step-ca stores each
// nonce in bbolt until it is used, and anyone can ask for one without a
// certificate (HEAD new-nonce), so its database grew without bound. A nonce only
// has to survive the seconds between being handed out and being used; one lost to
// a restart or to eviction makes the client retry with badNonce (RFC 8555 §6.5),
// which ACME clients, acmez among them, do by themselves.

// DefaultMaxNonces bounds the nonces held at once: about 80 bytes each.
const DefaultMaxNonces = 65536

// nonceTTL is how long an unused nonce stays valid.
const nonceTTL = 10 * time.Minute

type nonceID [16]byte

// nonceStore is a bounded set of outstanding nonces. Nonces are queued in the
// order they were made, which is also the order they expire in, so the oldest is
// dropped first when the store is full and expired ones are dropped from the head.
type nonceStore struct {
	mu    sync.Mutex
	max   int
	live  map[nonceID]int64 // outstanding nonce → expiry, unix nanoseconds
	queue []nonceEntry      // ring buffer, oldest at head; grows up to max
	head  int
	n     int // entries in queue (live or already used)
	now   func() time.Time
}

type nonceEntry struct {
	id      nonceID
	expires int64 // unix nanoseconds
}

func newNonceStore(max int) *nonceStore {
	if max <= 0 {
		max = DefaultMaxNonces
	}
	return &nonceStore{max: max, live: make(map[nonceID]int64), queue: make([]nonceEntry, min(max, 1024)), now: time.Now}
}

// create returns a fresh nonce, dropping expired ones and, when full, the oldest.
func (s *nonceStore) create() (string, error) {
	var id nonceID
	if _, err := rand.Read(id[:]); err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now().UnixNano()
	for s.n > 0 && (s.n == s.max || s.queue[s.head].expires <= now) {
		delete(s.live, s.queue[s.head].id)
		s.head = (s.head + 1) % len(s.queue)
		s.n--
	}
	if s.n == len(s.queue) { // full below max: grow, oldest first
		q := make([]nonceEntry, min(2*len(s.queue), s.max))
		copied := copy(q, s.queue[s.head:])
		copy(q[copied:], s.queue[:s.head])
		s.queue, s.head = q, 0
	}
	exp := now + int64(nonceTTL)
	s.queue[(s.head+s.n)%len(s.queue)] = nonceEntry{id: id, expires: exp}
	s.n++
	s.live[id] = exp
	return base64.RawURLEncoding.EncodeToString(id[:]), nil
}

// use consumes nonce; false if it was never issued, is used, expired or evicted.
// Its queue entry stays until it reaches the head; it no longer counts as live.
func (s *nonceStore) use(nonce string) bool {
	var id nonceID
	if base64.RawURLEncoding.DecodedLen(len(nonce)) != len(id) {
		return false
	}
	if n, err := base64.RawURLEncoding.Decode(id[:], []byte(nonce)); err != nil || n != len(id) {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	exp, ok := s.live[id]
	if !ok {
		return false
	}
	delete(s.live, id)
	// An expired nonce stays in the map until the next create sweeps it.
	return exp > s.now().UnixNano()
}

// len is the number of outstanding (issued, unused) nonces.
func (s *nonceStore) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.live)
}

// NonceStore keeps outstanding ACME nonces: in memory for one tpd, in the
// shared database (internal/server/pgstore) when several tpd answer one name, since a
// client's next request may reach another instance than the one that handed
// out its nonce.
type NonceStore interface {
	// Create hands out a fresh nonce, valid for NonceTTL.
	Create(ctx context.Context) (string, error)
	// Use consumes nonce: false if it was never issued, is used, expired or evicted.
	Use(ctx context.Context, nonce string) (bool, error)
	// Len is the number of outstanding nonces, for metrics.
	Len() int
}

// NonceTTL is how long an unused nonce stays valid.
const NonceTTL = nonceTTL

type memNonces struct{ *nonceStore }

func (m memNonces) Create(context.Context) (string, error) { return m.create() }
func (m memNonces) Use(_ context.Context, n string) (bool, error) {
	return m.use(n), nil
}
func (m memNonces) Len() int { return m.len() }

var _ NonceStore = memNonces{}

// nonceDB is step-ca's ACME database with nonces kept in a NonceStore.
type nonceDB struct {
	stepacme.DB
	nonces NonceStore
}

var _ stepacme.DB = nonceDB{}

func (db nonceDB) CreateNonce(ctx context.Context) (stepacme.Nonce, error) {
	n, err := db.nonces.Create(ctx)
	if err != nil {
		return "", stepacme.WrapErrorISE(err, "error creating nonce")
	}
	return stepacme.Nonce(n), nil
}

func (db nonceDB) DeleteNonce(ctx context.Context, nonce stepacme.Nonce) error {
	ok, err := db.nonces.Use(ctx, string(nonce))
	if err != nil {
		return stepacme.WrapErrorISE(err, "error checking nonce")
	}
	if !ok {
		return stepacme.NewError(stepacme.ErrorBadNonceType, "nonce is unknown, used or expired; retry with the nonce of this response")
	}
	return nil
}
