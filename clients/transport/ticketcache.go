package transport

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"sync"
	"time"

	"github.com/tp-proxy/tp/acme/login"
)

const (
	// maxTickets bounds the entries kept, in memory and in the file (one per
	// server name: tpd and the agents this device dials end to end).
	maxTickets = 32
	// maxTicketsFile bounds what is read of the file; a larger file is ignored.
	maxTicketsFile = 256 << 10
	// ticketWriteEvery spaces out rewrites of one entry in the file: tickets are
	// reusable until the certificate's end, and a busy tp forward gets a new one
	// per connection.
	ticketWriteEvery = 10 * time.Minute
)

// TicketCache is a tls.ClientSessionCache whose tickets are bound to the device
// certificate they were made with: a ticket is offered only while that same
// certificate is the current one and not yet due for renewal (a resumed
// handshake presents no certificate, so a renewal must come from a full one),
// and never after the certificate's end. With a Path it also keeps them in a
// file (0600, like the keys beside it): a ticket there lets whoever reads it
// resume as this device until the certificate expires, which is no more than
// key.pem in the same directory allows. A damaged or unwritable file only costs
// full handshakes.
type TicketCache struct {
	// Path is the file; "" keeps tickets in memory only.
	Path string
	// Leaf returns the certificate a full handshake would present now, or nil.
	Leaf func() *x509.Certificate
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	mu        sync.Mutex
	loaded    bool
	entries   map[string]*ticketEntry // by cert fingerprint + "|" + session key
	written   map[string]time.Time    // when an entry last reached the file
	forgotten map[string]bool         // dropped here: the file's copy goes too
}

type ticketEntry struct {
	Key      string    `json:"key"`       // crypto/tls's session key (the server name)
	Cert     string    `json:"cert"`      // SHA-256 of the device certificate, hex
	NotAfter time.Time `json:"not_after"` // that certificate's end: the entry's too
	Ticket   []byte    `json:"ticket"`
	State    []byte    `json:"state"` // tls.SessionState.Bytes
	Used     time.Time `json:"used"`  // the least recently used entry goes first
}

var _ tls.ClientSessionCache = (*TicketCache)(nil)

// NeedsRenewal reports whether a certificate is in the last third of its life or past it.
func NeedsRenewal(leaf *x509.Certificate, now time.Time) bool {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	return !now.Before(leaf.NotBefore.Add(life * 2 / 3))
}

func (t *TicketCache) now() time.Time {
	if t.Now != nil {
		return t.Now()
	}
	return time.Now()
}

// current is the fingerprint and end of the certificate tickets may be used
// with now, or ok false when there is none (missing, expired or due for renewal).
func (t *TicketCache) current() (fp string, notAfter time.Time, ok bool) {
	if t.Leaf == nil {
		return "", time.Time{}, false
	}
	leaf := t.Leaf()
	if leaf == nil || NeedsRenewal(leaf, t.now()) {
		return "", time.Time{}, false
	}
	sum := sha256.Sum256(leaf.Raw)
	return hex.EncodeToString(sum[:]), leaf.NotAfter, true
}

// Get returns a session for key made with the current certificate.
func (t *TicketCache) Get(key string) (*tls.ClientSessionState, bool) {
	fp, _, ok := t.current()
	if !ok {
		return nil, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.loadLocked()
	id := fp + "|" + key
	e := t.entries[id]
	if e == nil {
		return nil, false
	}
	if !t.now().Before(e.NotAfter) {
		t.forgetLocked(id)
		return nil, false
	}
	state, err := tls.ParseSessionState(e.State)
	if err != nil {
		t.forgetLocked(id)
		return nil, false
	}
	cs, err := tls.NewResumptionState(e.Ticket, state)
	if err != nil {
		t.forgetLocked(id)
		return nil, false
	}
	e.Used = t.now()
	return cs, true
}

// Put keeps cs for key under the current certificate; a nil cs forgets key's
// session (crypto/tls does so when the server would not resume it).
func (t *TicketCache) Put(key string, cs *tls.ClientSessionState) {
	fp, notAfter, ok := t.current()
	if !ok {
		return
	}
	id := fp + "|" + key
	t.mu.Lock()
	defer t.mu.Unlock()
	t.loadLocked()
	if cs == nil {
		if t.entries[id] != nil {
			t.forgetLocked(id)
			t.saveLocked()
		}
		return
	}
	ticket, state, err := cs.ResumptionState()
	if err != nil || state == nil {
		return
	}
	b, err := state.Bytes()
	if err != nil {
		return
	}
	now := t.now()
	delete(t.forgotten, id)
	t.entries[id] = &ticketEntry{Key: key, Cert: fp, NotAfter: notAfter, Ticket: ticket, State: b, Used: now}
	t.evictLocked(now)
	if last, ok := t.written[id]; !ok || now.Sub(last) >= ticketWriteEvery {
		t.written[id] = now
		t.saveLocked()
	}
}

// loadLocked reads the file once, keeping the entries that are still usable.
func (t *TicketCache) loadLocked() {
	if t.loaded {
		return
	}
	t.loaded = true
	t.entries = map[string]*ticketEntry{}
	t.written = map[string]time.Time{}
	t.forgotten = map[string]bool{}
	for _, e := range t.readFile() {
		id := e.Cert + "|" + e.Key
		t.entries[id] = e
		t.written[id] = e.Used
	}
	t.evictLocked(t.now())
}

// readFile returns the file's well-formed, unexpired entries; nothing when the
// file is missing, damaged or larger than maxTicketsFile.
func (t *TicketCache) readFile() []*ticketEntry {
	if t.Path == "" {
		return nil
	}
	f, err := os.Open(t.Path)
	if err != nil {
		return nil
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxTicketsFile+1))
	if err != nil || len(b) > maxTicketsFile {
		return nil
	}
	var file struct {
		Tickets []*ticketEntry `json:"tickets"`
	}
	if json.Unmarshal(b, &file) != nil {
		return nil
	}
	now := t.now()
	var out []*ticketEntry
	for _, e := range file.Tickets {
		if e != nil && e.Key != "" && len(e.Cert) == 2*sha256.Size && len(e.Ticket) > 0 && len(e.State) > 0 && now.Before(e.NotAfter) {
			out = append(out, e)
		}
	}
	return out
}

// evictLocked drops expired entries, then the least recently used beyond maxTickets.
func (t *TicketCache) evictLocked(now time.Time) {
	for id, e := range t.entries {
		if !now.Before(e.NotAfter) {
			delete(t.entries, id)
			delete(t.written, id)
		}
	}
	for len(t.entries) > maxTickets {
		var oldest string
		for id, e := range t.entries {
			if oldest == "" || e.Used.Before(t.entries[oldest].Used) {
				oldest = id
			}
		}
		delete(t.entries, oldest)
		delete(t.written, oldest)
	}
}

// saveLocked writes the entries to the file, merged with what other processes
// wrote there since it was read (this process's entries win; the last writer
// wins between processes, which costs at most a full handshake).
func (t *TicketCache) saveLocked() {
	if t.Path == "" {
		return
	}
	merged := map[string]*ticketEntry{}
	for _, e := range t.readFile() {
		merged[e.Cert+"|"+e.Key] = e
	}
	for id, e := range t.entries {
		merged[id] = e
	}
	for id := range t.forgotten {
		delete(merged, id)
	}
	all := &TicketCache{entries: merged}
	all.evictLocked(t.now())
	var file struct {
		Tickets []*ticketEntry `json:"tickets"`
	}
	for _, e := range all.entries {
		file.Tickets = append(file.Tickets, e)
	}
	b, err := json.Marshal(file)
	if err != nil || len(b) > maxTicketsFile {
		return
	}
	_ = login.WriteFileAtomic(t.Path, b, 0o600)
}

// forgetLocked drops id here and, at the next save, from the file.
func (t *TicketCache) forgetLocked(id string) {
	delete(t.entries, id)
	delete(t.written, id)
	t.forgotten[id] = true
}
