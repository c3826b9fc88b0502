package clients

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// The dialer's side of end-to-end carriers (e2emux.go): which carriers it
// holds, by name; which names it knows take none; and opening a session as a
// stream of one.

// muxNoneFor is how long a dialer remembers that a name's agent takes no
// carrier (an older agent), or that a destination answered without
// end-to-end TLS (not a protected name), before it offers a carrier again.
const muxNoneFor = 10 * time.Minute

// maxMuxNames bounds the names a dialer remembers (carriers and refusals).
const maxMuxNames = 1024

// muxStates is a Dialer's carriers by destination (host:port as dialed, lower
// case: the policy saw the port).
type muxStates struct {
	mu       sync.Mutex
	carriers map[string][]*muxConn
	pending  map[string]bool      // a dial that may open a carrier is under way
	none     map[string]time.Time // no carrier until then
	opened   int                  // carriers opened (E2EMuxStats)
	streams  int                  // sessions that went as a stream of a carrier
}

// muxClaim is a dial that may open a carrier: the only one under way for its
// destination. It travels in the dial's context to e2eSession.
type muxClaim struct {
	key      string
	early    *earlyDial // the dial's first bytes, or nil
	resolved bool       // the dial opened a carrier, or learnt that the agent takes none
	session  string     // the server's id of the dial's session (for why)
}

type muxClaimKey struct{}

// muxDial carries a TCP dial of addr as a stream of a carrier the Dialer holds
// to it. handled is false when it holds none that takes a stream (claim, when
// not nil, then says that this dial may open one: it must be released).
func (d *Dialer) muxDial(ctx context.Context, addr string, early *earlyDial) (c net.Conn, handled bool, claim *muxClaim, err error) {
	if d.NoE2EMux || d.NoE2EAttach {
		return nil, false, nil, nil
	}
	key := strings.ToLower(addr)
	for {
		st := &d.mux
		st.mu.Lock()
		now := time.Now()
		var m *muxConn
		for _, cand := range st.carriers[key] {
			if cand.Usable(now) {
				m = cand
				break
			}
		}
		if m == nil {
			if until, ok := st.none[key]; ok && now.Before(until) {
				st.mu.Unlock()
				return nil, false, nil, nil
			}
			if st.pending[key] || len(st.carriers[key]) >= muxMaxCarriers {
				st.mu.Unlock() // another dial is opening one: this one goes on its own
				return nil, false, nil, nil
			}
			if st.pending == nil {
				st.pending = map[string]bool{}
			}
			st.pending[key] = true
			st.mu.Unlock()
			return nil, false, &muxClaim{key: key, early: early}, nil
		}
		st.mu.Unlock()
		c, err := d.muxSession(ctx, m, addr, early)
		if errors.Is(err, errMuxFull) {
			continue // it filled up or ended meanwhile; nothing was sent
		}
		if err == nil && m.session != "" {
			// Its failures are cuts; when the carrier was cut, the server can
			// say why (CutError.Explain asks about the carrier's session).
			c = &tunnel{Stream: c.(wire.Stream), d: d, session: m.session}
		}
		return c, true, nil, err
	}
}

// releaseMux ends a claim: a dial that succeeded without opening a carrier and
// without meeting an agent (the destination is no protected name, or was
// reached through attach state) leaves the destination marked for muxNoneFor.
func (d *Dialer) releaseMux(claim *muxClaim, dialErr error) {
	if claim == nil {
		return
	}
	st := &d.mux
	st.mu.Lock()
	defer st.mu.Unlock()
	delete(st.pending, claim.key)
	if dialErr == nil && !claim.resolved {
		st.markNoneLocked(claim.key)
	}
}

func (st *muxStates) markNoneLocked(key string) {
	if st.none == nil || len(st.none) >= maxMuxNames {
		st.none = map[string]time.Time{} // bounded: start over rather than grow
	}
	st.none[key] = time.Now().Add(muxNoneFor)
}

// add keeps a new carrier for key, and forgets it when it ends.
func (st *muxStates) add(key string, m *muxConn) {
	st.mu.Lock()
	if st.carriers == nil || (len(st.carriers) >= maxMuxNames && st.carriers[key] == nil) {
		if st.carriers == nil {
			st.carriers = map[string][]*muxConn{}
		} else { // bounded: a dialer rarely reaches this many names; the dropped ones end when idle
			for k := range st.carriers {
				delete(st.carriers, k)
				break
			}
		}
	}
	st.carriers[key] = append(st.carriers[key], m)
	st.opened++
	st.mu.Unlock()
	go func() {
		<-m.Done()
		st.mu.Lock()
		defer st.mu.Unlock()
		l := st.carriers[key]
		for i, c := range l {
			if c == m {
				l = append(l[:i:i], l[i+1:]...)
				break
			}
		}
		if len(l) == 0 {
			delete(st.carriers, key)
		} else {
			st.carriers[key] = l
		}
	}()
}

// E2EMuxStats says how many end-to-end carriers this Dialer opened and how
// many sessions went as streams of one.
func (d *Dialer) E2EMuxStats() (carriers, streams int) {
	d.mux.mu.Lock()
	defer d.mux.mu.Unlock()
	return d.mux.opened, d.mux.streams
}

// closeMux ends the Dialer's carriers (their open streams are cut).
func (d *Dialer) closeMux() {
	d.mux.mu.Lock()
	var all []*muxConn
	for _, l := range d.mux.carriers {
		all = append(all, l...)
	}
	d.mux.mu.Unlock()
	for _, m := range all {
		_ = m.Fail(errors.New("the dialer closed"))
	}
}

// muxSession opens a stream on m for a dial of addr, sends the dial's first
// bytes with the stream's opening, and reads the agent's answer.
func (d *Dialer) muxSession(ctx context.Context, m *muxConn, addr string, early *earlyDial) (net.Conn, error) {
	var first []byte
	if early != nil && !early.sent && !early.sealed {
		first = early.first
	}
	s, err := m.Open(first)
	if err != nil {
		if errors.Is(err, errMuxFull) {
			return nil, err
		}
		// The carrier broke under this dial: nothing reached the agent but
		// perhaps the opening. A dial without first bytes may go again.
		if len(first) == 0 {
			return nil, errMuxFull
		}
		return nil, fmt.Errorf("tp dial %s: opening a stream of the end-to-end carrier: %w", addr, err)
	}
	if len(first) > 0 {
		early.sent, early.sealed = true, true // the agent passes them on after its ok; never sent twice
	}
	d.mux.mu.Lock()
	d.mux.streams++
	d.mux.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { _ = s.SetReadDeadline(time.Unix(1, 0)) })
	sh, err := wire.ReadServerHello(s)
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		s.Abort(wire.QUICInternal)
		if len(first) == 0 && ctx.Err() == nil && errors.Is(err, wire.ErrTruncated) && m.Ended() {
			// The carrier broke before the agent answered (the agent restarted,
			// the server cut it) and nothing of the session can have reached
			// the service: the dial goes again, on another carrier or alone.
			return nil, errMuxFull
		}
		return nil, fmt.Errorf("tp dial %s: reading the agent's answer on the end-to-end carrier: %w", addr, err)
	}
	_ = s.SetReadDeadline(time.Time{})
	if !sh.OK {
		_ = s.Close()
		return nil, &RefusedError{Code: sh.Code, Reason: sh.Reason, Agent: hostOf(addr)}
	}
	return s, nil
}

// startMux turns a just handshaken end-to-end TLS session (ALPN tp-e2e-mux/1)
// into a carrier for claim's destination, and opens the dial's session as its
// first stream.
func (d *Dialer) startMux(ctx context.Context, tc *tls.Conn, batch *transport.BatchConn, addr string, claim *muxClaim) (net.Conn, error) {
	claim.resolved = true
	cs := tc.ConnectionState()
	expires := cs.PeerCertificates[0].NotAfter // the carrier ends with either certificate
	if own, err := d.ownNotAfter(); err == nil {
		expires = minTime(expires, own)
	}
	host, _, _ := net.SplitHostPort(addr)
	m := newMuxConn(&transport.BatchedTLS{Conn: tc, Batch: batch}, true, host, expires, d.TLSConfig.Time, nil)
	m.session = claim.session
	d.mux.add(claim.key, m)
	c, err := d.muxSession(ctx, m, addr, claim.early)
	if errors.Is(err, errMuxFull) {
		err = fmt.Errorf("tp dial %s: the end-to-end carrier ended as it opened: %v", addr, m.Err())
	}
	return c, err
}

// ownNotAfter is the end of this device's certificate, as far as the Dialer
// can tell.
func (d *Dialer) ownNotAfter() (time.Time, error) {
	if d.TLSConfig == nil || len(d.TLSConfig.Certificates) == 0 {
		return time.Time{}, errors.New("no static certificate")
	}
	c := d.TLSConfig.Certificates[0]
	if c.Leaf != nil {
		return c.Leaf.NotAfter, nil
	}
	return time.Time{}, errors.New("no parsed leaf")
}

// noMux records that claim's destination answered without a carrier (an
// older agent): later dials run their own sessions for muxNoneFor.
func (d *Dialer) noMux(claim *muxClaim) {
	claim.resolved = true
	d.mux.mu.Lock()
	d.mux.markNoneLocked(claim.key)
	d.mux.mu.Unlock()
}

// muxClaimFrom is the carrier claim of the dial ctx belongs to, or nil.
func muxClaimFrom(ctx context.Context) *muxClaim {
	c, _ := ctx.Value(muxClaimKey{}).(*muxClaim)
	return c
}
