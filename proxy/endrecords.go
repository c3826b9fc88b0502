package proxy

import (
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// endRecords keeps how recently aborted sessions ended, for op "why": a bounded
// ring of at most maxEndRecords, each kept for endRecordTTL.
type endRecords struct {
	mu    sync.Mutex
	m     map[string]endRecord
	ring  []string
	next  int
	clock func() time.Time // nil: time.Now; tests move it to see records expire
}

type endRecord struct {
	owner string // device ID of the session's client
	end   wire.SessionEnd
	at    time.Time
}

const (
	maxEndRecords = 4096
	endRecordTTL  = time.Minute
)

func (r *endRecords) now() time.Time {
	if r.clock != nil {
		return r.clock()
	}
	return time.Now()
}

func (r *endRecords) add(id, owner string, end wire.SessionEnd) {
	if id == "" {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = make(map[string]endRecord)
		r.ring = make([]string, maxEndRecords)
	}
	if old := r.ring[r.next]; old != "" {
		delete(r.m, old)
	}
	r.ring[r.next] = id
	r.next = (r.next + 1) % maxEndRecords
	r.m[id] = endRecord{owner: owner, end: end, at: r.now()}
}

func (r *endRecords) get(id, owner string) (wire.SessionEnd, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rec, ok := r.m[id]
	if !ok || rec.owner != owner || r.now().Sub(rec.at) > endRecordTTL {
		return wire.SessionEnd{}, false
	}
	return rec.end, true
}
