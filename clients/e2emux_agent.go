package clients

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// The agent's side of end-to-end carriers (e2emux.go).

// serveMux serves a protected session whose end-to-end TLS session negotiated
// tp-e2e-mux/1: a carrier of many sessions, each a stream the dialer opens.
// Every stream is checked as a session of its own (admit: the dialer's identity
// against the carrier's session header, the allow list as it is now, the local
// service) and answered with a hello; code, when not empty, is the refusal of
// the dialer's certificate every stream gets (the carrier then ends). pre, the
// connection to the service started with the session, goes to the first stream.
func (a *Agent) serveMux(ctx context.Context, tc *tls.Conn, batch *transport.BatchConn, cs tls.ConnectionState, hdr wire.SessionHeader,
	full, local string, udp bool, pre *localDial, code, reason, device, user string, expires time.Time, answered func(), log *slog.Logger) {
	answered()
	start := time.Now()
	// tpd logs the carrier as one session: each stream gets a line here.
	log = log.With("e2e", "mux", "carrier", hdr.Session)
	if udp { // a dialer offers a carrier only for a TCP name
		wire.Abort(tc, wire.QUICInternal)
		log.Warn("tp expose: a dialer opened an end-to-end carrier for a UDP name; refused")
		return
	}

	var (
		wg      sync.WaitGroup
		first   atomic.Pointer[localDial]
		streams atomic.Int64
		m       *muxConn
		ready   = make(chan struct{})
		aborts  abortWatch // past its bound the carrier takes no further stream
	)
	first.Store(pre)
	accept := func(s *muxStream) { // on the carrier's reader: it must not wait
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-ready
			streams.Add(1)
			slog := log.With("stream", s.ID())
			if code != "" {
				sess := &e2eSession{Stream: s, bridge: s, capsules: s}
				sess.refuse(code, reason, slog)
				_ = m.GoAway()
				_ = m.Close() // cleanly, so the refusal reaches the dialer first
				return
			}
			if aborts.flooded.Load() {
				s.AbortWith(mux.AbortRefused) // opened before the dialer saw the GOAWAY below
				return
			}
			p := first.Swap(nil) // the first stream's, if any
			defer p.discard()    // unused when the stream was refused
			// Streams count against the agent's bound on sessions (MaxSessions),
			// as the sessions the server opens over QUIC do.
			defer a.muxStreams.Add(-1)
			if n := a.muxStreams.Add(1); n > a.maxSessions() {
				sess := &e2eSession{Stream: s, bridge: s, capsules: s}
				sess.refuse(wire.CodeReverseBusy, fmt.Sprintf("the agent of %s serves as many sessions as it takes (%d)", full, a.maxSessions()), slog)
				return
			}
			sess := &e2eSession{Stream: s, bridge: s, capsules: s}
			if aborts.admit(ctx, s.Context(), sess, func(sctx context.Context) {
				a.admit(sctx, sess, hdr, full, local, false, p, nil, device, user, time.Now(), slog)
			}) {
				log.Warn("tp expose: end-to-end carrier takes no more streams (GOAWAY) and ends with its last: its dialer aborted more sessions before their answer than it let be answered (rapid reset)",
					"aborted", aborts.aborted.Load(), "answered", aborts.answered.Load())
				m.Drain()
			}
		}()
	}
	m = newMuxConn(&transport.BatchedTLS{Conn: tc, Batch: batch}, false, full, expires, a.inner.Time, accept)
	a.mu.Lock()
	if a.carriers == nil {
		a.carriers = map[*muxConn]struct{}{}
	}
	a.carriers[m] = struct{}{}
	a.mu.Unlock()
	close(ready) // streams are served once a drain can find the carrier
	defer func() {
		a.mu.Lock()
		delete(a.carriers, m)
		a.mu.Unlock()
	}()
	stop := context.AfterFunc(ctx, func() { m.Fail(errors.New("the agent stops")) })
	defer stop()
	<-m.Done()
	wg.Wait()
	why := m.Err()
	end := "closed"
	if why != nil {
		end = why.Error()
	}
	log.Info("tp expose: end-to-end carrier ended", "streams", streams.Load(), "duration", time.Since(start), "end", end)
}

// cancelFlood is how many streams a carrier's or a pair's dialer may abort
// before their answer, beyond as many as it let be answered, before the
// carrier takes no further stream (serveMux) or the pair ends (serveDirect).
const cancelFlood = 100

// errDialerCancelled is the cause of a set-up whose dialer aborted the stream
// before its answer.
var errDialerCancelled = errors.New("the dialer aborted the session before its answer")

// abortWatch counts the streams of one carrier or pair that the dialer
// aborted before their answer, and those answered: a dialer that aborts more
// than it lets be answered (a rapid reset) makes the agent dial its service
// for nothing.
type abortWatch struct {
	aborted, answered atomic.Int64
	flooded           atomic.Bool
}

// admit runs serve (the agent's admission of sess) with a context that ends
// when the dialer aborts the stream, whose context is stc, before its answer.
// It says true once, for the abort that takes the dialer past cancelFlood.
func (w *abortWatch) admit(ctx, stc context.Context, sess *e2eSession, serve func(context.Context)) bool {
	sctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stopWatch := context.AfterFunc(stc, func() {
		if wire.PeerCancelled(context.Cause(stc)) {
			cancel(errDialerCancelled)
		}
	})
	sess.answered = func() {
		stopWatch()
		w.answered.Add(1)
	}
	serve(sctx)
	stopWatch()
	if !errors.Is(context.Cause(sctx), errDialerCancelled) {
		return false
	}
	return w.abort()
}

// abort counts a stream the dialer aborted before its answer; true once, for
// the abort that takes the dialer past cancelFlood.
func (w *abortWatch) abort() bool {
	n := w.aborted.Add(1)
	return n > cancelFlood && n > w.answered.Load() && w.flooded.CompareAndSwap(false, true)
}

// drainCarriers tells the dialer of every carrier that it takes no further
// stream (GOAWAY), and ends each once its last stream ended: the server they
// run through stops, and waits for its sessions.
func (a *Agent) drainCarriers() {
	a.mu.Lock()
	all := make([]*muxConn, 0, len(a.carriers))
	for m := range a.carriers {
		all = append(all, m)
	}
	a.mu.Unlock()
	for _, m := range all {
		m.Drain()
	}
}

// SetAllow replaces who may connect (Agent.AllowUsers, AllowGroups) while the
// agent runs: every later session, and every later stream of an end-to-end
// carrier, is checked against the new lists.
func (a *Agent) SetAllow(users, groups []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.AllowUsers, a.AllowGroups = users, groups
}
