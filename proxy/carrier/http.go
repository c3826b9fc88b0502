package carrier

// The http carrier's server end (docs/PROTOCOL.md §9.8): POST requests at
// wire.CarrierHTTPPath carry client → server packets in their bodies and get
// server → client packets in their responses, both in the tls carrier's
// framing. A session is named by the client's random ID (header
// wire.CarrierSessionHeader); the first request with an unknown ID opens one,
// with the client's key (wire.CarrierKeyHeader), and every later request
// proves with a MAC under the session's key that it is the opener's
// (wire.CarrierAuthHeader, each sequence number once): knowing the ID, which
// travels in the clear on plain HTTP and through a CDN, is not enough to
// read the session's packets, inject into it or take its request slots. A
// request without packets is held up to carrierPollHold while the session
// has nothing to send.

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// carrierPollHold is how long an empty poll waits for a packet (a variable
// only so that a test can hold polls for as long as it needs).
var carrierPollHold = time.Second

// carrierHTTPConcurrent bounds the requests in flight per session.
const carrierHTTPConcurrent = 4

type httpSession struct {
	cs       *session
	inflight chan struct{} // a slot per request in flight
	key      []byte        // the session key: requests' MACs
	mu       sync.Mutex
	replay   wire.CarrierReplay // sequence numbers taken
}

// HTTPSessions are the http carrier's sessions by ID; the zero value is
// ready. They belong to one Mux at a time: a request for another (a new
// QUIC server) forgets the old sessions, which ended with their mux.
type HTTPSessions struct {
	mu       sync.Mutex
	m        *Mux // the mux the sessions belong to
	sessions map[string]*httpSession
}

// lookup returns the live session id, or nil.
func (h *HTTPSessions) lookup(m *Mux, id string) *httpSession {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.m != m { // a new QUIC server: the old sessions are gone with its mux
		h.m, h.sessions = m, make(map[string]*httpSession)
	}
	if s := h.sessions[id]; s != nil {
		select {
		case <-s.cs.done:
			delete(h.sessions, id)
		default:
			return s
		}
	}
	return nil
}

// get returns the session id, opening it with key when there is none (created).
func (h *HTTPSessions) get(m *Mux, id, remote string, key []byte) (_ *httpSession, created bool, _ error) {
	if s := h.lookup(m, id); s != nil {
		return s, false, nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if s := h.sessions[id]; s != nil { // opened meanwhile
		return s, false, nil
	}
	cs, err := m.open(wire.CarrierHTTP, remote, "") // unproven: no certificate on the website side
	if err != nil {
		return nil, false, err
	}
	s := &httpSession{cs: cs, inflight: make(chan struct{}, carrierHTTPConcurrent), key: key}
	h.sessions[id] = s
	go h.expire(m, id, s)
	return s, true, nil
}

// expire ends a session that saw no request for the mux's idle bound.
func (h *HTTPSessions) expire(m *Mux, id string, s *httpSession) {
	t := time.NewTicker(m.opts.sweepEvery())
	defer t.Stop()
	for {
		select {
		case <-s.cs.done:
		case <-t.C:
			why := m.overdue(s.cs)
			if why == "" || why == "carrier idle" && len(s.inflight) > 0 {
				continue
			}
			m.end(s.cs)
			m.log.Info("carrier session", "carrier", wire.CarrierHTTP, "remote", s.cs.remote, "addr", s.cs.addr.String(),
				"packets_in", s.cs.in.Load(), "packets_out", s.cs.o.Load(), "dropped_out", s.cs.drops.Load(),
				"duration", time.Since(s.cs.opened), "end", why)
		}
		h.mu.Lock()
		if h.sessions[id] == s {
			delete(h.sessions, id)
		}
		h.mu.Unlock()
		return
	}
}

// Serve serves one request of the http carrier on m's sessions.
func (h *HTTPSessions) Serve(m *Mux, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		http.Error(w, "the http carrier takes POST requests", http.StatusMethodNotAllowed)
		return
	}
	id := r.Header.Get(wire.CarrierSessionHeader)
	if !wire.ValidCarrierSession(id) {
		http.Error(w, "the http carrier needs a session ID of 32 hex digits in "+wire.CarrierSessionHeader, http.StatusBadRequest)
		return
	}
	// The body is read whole, within its bound, before a session is touched.
	body, err := io.ReadAll(io.LimitReader(r.Body, wire.MaxCarrierBody+1))
	if err != nil {
		http.Error(w, "reading the request body: "+err.Error(), http.StatusBadRequest)
		return
	}
	if len(body) > wire.MaxCarrierBody {
		http.Error(w, "the request body is longer than the http carrier allows", http.StatusRequestEntityTooLarge)
		return
	}
	packets, err := splitCarrierFrames(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	// Who may use the session: its opener, proven by the MAC of a sequence
	// number not taken before; checked before the request takes a slot.
	hs := h.lookup(m, id)
	created := false
	if hs == nil {
		peer := r.Header.Get(wire.CarrierKeyHeader)
		if peer == "" {
			if r.Header.Get(wire.CarrierAuthHeader) != "" {
				http.Error(w, "no such http carrier session (it ended); open a new one", http.StatusNotFound)
				return
			}
			http.Error(w, "an http carrier session opens with the client's X25519 key in "+wire.CarrierKeyHeader+" (update tp)", http.StatusBadRequest)
			return
		}
		priv, pub, err := wire.NewCarrierKey()
		if err != nil {
			http.Error(w, "making a key: "+err.Error(), http.StatusInternalServerError)
			return
		}
		key, err := wire.CarrierSessionKey(priv, peer, id)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if hs, created, err = h.get(m, id, r.RemoteAddr, key); err != nil {
			http.Error(w, "too many carrier sessions; try again later", http.StatusServiceUnavailable)
			return
		}
		if !created { // another request opened it meanwhile: this one proves nothing
			http.Error(w, wire.ErrCarrierAuth.Error()+"; the session belongs to whoever opened it", http.StatusForbidden)
			return
		}
		w.Header().Set(wire.CarrierKeyHeader, pub)
	} else {
		seq, err := wire.CheckCarrierAuth(hs.key, id, r.Header.Get(wire.CarrierAuthHeader), body)
		if err == nil {
			hs.mu.Lock()
			if !hs.replay.Take(seq) {
				err = errors.New("the request's sequence number in " + wire.CarrierAuthHeader + " was taken before (a replay)")
			}
			hs.mu.Unlock()
		}
		if err != nil {
			http.Error(w, err.Error()+"; the session belongs to whoever opened it", http.StatusForbidden)
			return
		}
	}
	select {
	case hs.inflight <- struct{}{}:
		defer func() { <-hs.inflight }()
	default:
		http.Error(w, "too many requests in flight for this carrier session", http.StatusTooManyRequests)
		return
	}
	cs := hs.cs
	cs.touch()
	for _, p := range packets {
		buf := getCarrierBuf()
		n := copy(*buf, p)
		m.deliver(cs, buf, n)
	}

	// The answer: what the session has queued now; for a request without
	// packets, the first packet within carrierPollHold (not for the request
	// that opened the session: the client waits for that one).
	var out bytes.Buffer
	take := func(b *[]byte) {
		_ = wire.WriteCarrierFrame(&out, *b, nil)
		putCarrierBuf(b)
		cs.o.Add(1)
	}
	if len(packets) == 0 && !created && len(cs.out) == 0 {
		t := time.NewTimer(carrierPollHold)
		select {
		case b := <-cs.out:
			take(b)
		case <-t.C:
		case <-cs.done:
		case <-r.Context().Done():
		}
		t.Stop()
	}
	for out.Len() < wire.MaxCarrierBody-2-wire.MaxCarrierPacket {
		select {
		case b := <-cs.out:
			take(b)
			continue
		default:
		}
		break
	}
	cs.touch()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(out.Bytes())
}

// splitCarrierFrames splits a body into its packets; a frame that breaks the
// framing fails the whole body (nothing of it is delivered).
func splitCarrierFrames(body []byte) ([][]byte, error) {
	var packets [][]byte
	r := bufio.NewReader(bytes.NewReader(body))
	buf := make([]byte, wire.MaxCarrierPacket)
	for {
		n, err := wire.ReadCarrierFrame(r, buf)
		if errors.Is(err, io.EOF) {
			return packets, nil
		}
		if err != nil {
			return nil, err
		}
		packets = append(packets, bytes.Clone(buf[:n]))
	}
}
