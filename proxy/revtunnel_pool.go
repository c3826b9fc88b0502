package proxy

// The holder of a name (or public port) served by reverse tunnels: one
// reverse.Agent in the registry for all the tunnels one device holds it with,
// the pool of waiting tunnels, and the round-tripper tpd's website sends the
// name's requests through.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// tunnelState is the registry's part for reverse tunnels (reverse_registry.go).
type tunnelState struct {
	mu      sync.Mutex
	holders map[string]*tunnelHolder // registry key → holder
	perID   map[string]int           // tunnels per device identity
	// gone keeps, for the pickup time, the reverse names whose last tunnel
	// just closed: an exposer replaces a tunnel TP closed idle at once, and a
	// request arriving in between waits for the next holder (of the same
	// device, with the same access) rather than failing. Expired entries go
	// whenever one is added. Only without a shared hold store: with one, the
	// next tunnel may reach another instance, and the request goes there.
	gone map[string]goneHolder
	// joined is closed, and replaced, whenever a holder starts: requests
	// waiting for a name's next holder look again.
	joined chan struct{}
}

// goneHolder is what is remembered of a name's holder after its last tunnel.
type goneHolder struct {
	access holderAccess
	until  time.Time
}

// holderAccess is who holds a name and who may reach it: a request goes only
// to a holder with the access it was let in for.
type holderAccess struct {
	owner       string
	devicesOnly bool
}

func (h *tunnelHolder) access() holderAccess {
	return holderAccess{owner: h.owner, devicesOnly: h.target.DevicesOnly}
}

type tunnelHolder struct {
	key    string
	target reverse.Target
	owner  string
	agent  *reverse.Agent
	ctx    context.Context // ends when the holder is replaced, revoked or shut down
	cancel context.CancelCauseFunc
	n      int // tunnels, under tunnelState.mu
	opts   ReverseTunnelOptions
	pickup time.Duration

	idle   reverse.WaitPool[reverse.TunnelConn] // HTTP/1.1 tunnels waiting for a request
	listen reverse.WaitPool[*listenReq]         // listen-tcp requests waiting for a connection
	h2     reverse.SyncList[*http2.ClientConn]  // tunnels that chose h2 (HTTP app: requests; listen-tcp: CONNECTs)
	h1     *http.Transport                      // sends requests over the idle tunnels
	// h2Pending counts h2 tunnels answered but not in h2 yet, so that a request
	// arriving meanwhile waits for them rather than for an HTTP/1.1 tunnel;
	// h1Tunnels counts the tunnels that chose HTTP/1.1.
	h2Pending, h1Tunnels atomic.Int32
}

// tunnelTicket is one tunnel's place in its holder.
type tunnelTicket struct {
	id      authz.Identity
	rec     *tunnelRec
	pending bool // counted in h2Pending
}

// join counts a tunnel for target by id, creating and claiming the holder when
// it is the first one. Another identity's hold is refused with 403.
func (st *tunnelState) join(s *Server, target reverse.Target, id authz.Identity, alpn string) (*tunnelHolder, *tunnelTicket, *reverse.Refusal) {
	o := s.rev.opts.HTTPTunnels
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.holders == nil {
		st.holders, st.perID = map[string]*tunnelHolder{}, map[string]int{}
	}
	if st.perID[id.DeviceID] >= o.MaxPerIdentity {
		return nil, nil, reverse.Refuse(http.StatusTooManyRequests, CodeTooManySessions,
			"%s holds %d reverse tunnels, as many as this server allows per device; close some first", id, o.MaxPerIdentity)
	}
	key := target.Key()
	h := st.holders[key]
	if h != nil && h.ctx.Err() != nil {
		h = nil // replaced by a newer holder (a tp expose of the same device): start over
	}
	if h != nil && h.owner != id.DeviceID {
		return nil, nil, reverse.Refuse(http.StatusForbidden, wire.CodeNameTaken, "%s is held by another identity's reverse tunnels; choose another", target)
	}
	if h == nil {
		h = s.newHolder(target, id)
		replaced, herr := s.rev.Claim(h.agent)
		if herr != nil {
			status := http.StatusForbidden
			switch {
			case herr.Code == CodeTooManyNames:
				status = http.StatusTooManyRequests
			case herr.Code == wire.CodePublicRefused && strings.Contains(herr.Reason, "cannot open"):
				status = http.StatusServiceUnavailable
			}
			h.cancel(herr)
			return nil, nil, reverse.Refuse(status, herr.Code, "%s", herr.Reason)
		}
		for _, old := range replaced {
			old.End(reverse.ErrReplaced)
		}
		st.holders[key] = h
		delete(st.gone, key)
		if st.joined != nil {
			close(st.joined)
			st.joined = nil
		}
	}
	if h.target.DevicesOnly != target.DevicesOnly {
		return nil, nil, reverse.Refuse(http.StatusConflict, wire.CodeNameTaken,
			"%s is served to %s by this device's other tunnels; open every tunnel with the same %s, or close the others first",
			target.Full, accessOf(h.target.DevicesOnly), reverse.AccessField)
	}
	if h.n >= o.MaxPerName {
		return nil, nil, reverse.Refuse(http.StatusTooManyRequests, CodeTooManySessions,
			"%s has %d reverse tunnels, as many as this server allows per name; use fewer spare tunnels", target, o.MaxPerName)
	}
	h.n++
	st.perID[id.DeviceID]++
	tk := &tunnelTicket{id: id}
	if alpn == "h2" {
		// Counted before the public port can see a connection or the name a
		// request: those wait for the tunnel rather than take another path.
		h.h2Pending.Add(1)
		tk.pending = true
	}
	return h, tk, nil
}

// h2Ready ends t's pending count (once): its ClientConn is in h.h2, or it failed.
func (h *tunnelHolder) h2Ready(t *tunnelTicket) {
	if t.pending {
		t.pending = false
		h.h2Pending.Add(-1)
		h.h2.Notify()
	}
}

// leave uncounts a tunnel; the last one releases the name, which stays reserved
// for its owner for the grace period.
func (st *tunnelState) leave(s *Server, h *tunnelHolder, t *tunnelTicket) {
	st.mu.Lock()
	h.n--
	if st.perID[t.id.DeviceID]--; st.perID[t.id.DeviceID] <= 0 {
		delete(st.perID, t.id.DeviceID)
	}
	last := h.n == 0
	if last && st.holders[h.key] == h {
		delete(st.holders, h.key)
		// A name's, not ended by a replacement or revocation, on a single
		// instance.
		if h.target.Port == 0 && h.ctx.Err() == nil && s.rev.opts.Store == nil {
			now := time.Now()
			if st.gone == nil {
				st.gone = map[string]goneHolder{}
			}
			for k, g := range st.gone {
				if !now.Before(g.until) {
					delete(st.gone, k)
				}
			}
			st.gone[h.key] = goneHolder{access: h.access(), until: now.Add(h.pickup)}
		}
	}
	st.mu.Unlock()
	h.h2Ready(t)
	if last {
		s.rev.Release(h.agent, s.rev.opts.Grace)
		h.cancel(errors.New("the last reverse tunnel of " + h.target.String() + " closed"))
		h.h1.CloseIdleConnections()
	}
}

func (st *tunnelState) holder(key string) *tunnelHolder {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.holderLocked(key)
}

// holderLocked is key's live holder, nil if none; st.mu is held.
func (st *tunnelState) holderLocked(key string) *tunnelHolder {
	h := st.holders[key]
	if h == nil || h.ctx.Err() != nil {
		return nil
	}
	return h
}

// recentlyGone returns what is remembered of key's holder if its last tunnel
// closed within the pickup time and no other holds the name yet.
func (st *tunnelState) recentlyGone(key string) (goneHolder, bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	g, ok := st.gone[key]
	return g, ok && time.Now().Before(g.until)
}

// current returns key's holder, if any, and a channel closed when a holder
// (of any name) starts next.
func (st *tunnelState) current(key string) (*tunnelHolder, <-chan struct{}) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.joined == nil {
		st.joined = make(chan struct{})
	}
	return st.holderLocked(key), st.joined
}

func (s *Server) newHolder(target reverse.Target, id authz.Identity) *tunnelHolder {
	o := s.rev.opts.HTTPTunnels
	h := &tunnelHolder{key: target.Key(), target: target, owner: id.DeviceID, opts: o, pickup: s.rev.opts.PickupTimeout}
	h.ctx, h.cancel = context.WithCancelCause(context.Background())
	a := &reverse.Agent{ID: id, Transport: "reverse-tunnel", UDP: map[string]bool{}, Ctx: h.ctx, End: h.cancel,
		DevicesOnly: target.Port == 0 && target.DevicesOnly}
	if target.Port != 0 {
		a.Public = []reverse.PublicClaim{{PublicSpec: wire.PublicSpec{Net: "tcp", Port: target.Port}}}
		a.Open = func(ctx context.Context, hdr wire.SessionHeader) (wire.Stream, *wire.HelloError) {
			return s.openTCPTunnel(ctx, h, hdr)
		}
	} else {
		a.Names = []string{target.Full}
		a.Open = func(context.Context, wire.SessionHeader) (wire.Stream, *wire.HelloError) {
			return nil, wire.Errorf(wire.CodeUnsupportedNetwork, "%s is an HTTP app served through reverse tunnels; open https://%s/ instead", target.Full, target.Full)
		}
	}
	a.OpenFlow = func(context.Context, wire.SessionHeader, int) (*wire.UDPFlow, *wire.HelloError) {
		return nil, wire.Errorf(wire.CodeUnsupportedNetwork, "%s carries no UDP", target)
	}
	h.agent = a
	h.h1 = &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, ok := h.idle.Take(ctx, h.pickup, h.ctx.Done())
			if !ok {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				if h.ctx.Err() != nil {
					return nil, fmt.Errorf("%w: %w", errTunnelsGone, context.Cause(h.ctx))
				}
				return nil, fmt.Errorf("no reverse tunnel of %s became free within %s", target.Full, h.pickup)
			}
			return c, nil
		},
		MaxIdleConnsPerHost:    o.MaxPerName,
		IdleConnTimeout:        o.IdleTimeout,
		MaxResponseHeaderBytes: int64(o.MaxHeaderBytes),
		DisableCompression:     true,
		TLSNextProto:           map[string]func(string, *tls.Conn) http.RoundTripper{},
	}
	return h
}

// h2Transport makes the ClientConns of tunnels that chose h2: pings find a
// dead tunnel, and an idle one is closed.
func (h *tunnelHolder) h2Transport() *http2.Transport {
	return &http2.Transport{
		AllowHTTP:         true,
		ReadIdleTimeout:   30 * time.Second,
		PingTimeout:       15 * time.Second,
		IdleConnTimeout:   h.opts.IdleTimeout,
		MaxHeaderListSize: uint32(h.opts.MaxHeaderBytes),
	}
}

// serveH2 holds a tunnel that chose h2 (an HTTP app's multiplexed tunnel, or a
// listen-tcp tunnel with bind semantics): TP is the h2 client on it, and
// requests (or CONNECTs) go out over it until it ends or ctx does.
func (h *tunnelHolder) serveH2(ctx context.Context, tun *tunnelTicket, conn reverse.TunnelConn) {
	cc, err := h.h2Transport().NewClientConn(conn)
	if err != nil {
		tun.rec.end = "h2 client preface: " + err.Error()
		wire.Abort(conn, wire.QUICInternal)
		return
	}
	remove := h.h2.Add(cc)
	defer remove()
	h.h2Ready(tun)
	select {
	case <-conn.Done():
	case <-ctx.Done():
		_ = cc.Close()
		wire.Abort(conn, wire.AbortCode(context.Cause(ctx)))
	}
}

// serveHTTPTunnel serves the tunnel of an HTTP app until it ends.
func (s *Server) serveHTTPTunnel(ctx context.Context, w http.ResponseWriter, r *http.Request, h *tunnelHolder, tun *tunnelTicket, alpn string) {
	extra := http.Header{}
	if _, hasALPN, _ := reverse.ParseALPN(r.Header); hasALPN {
		extra.Set("Selected-ALPN", reverse.ALPNToken(alpn))
	}
	if alpn != "h2" {
		h.h1Tunnels.Add(1)
		defer h.h1Tunnels.Add(-1)
	}
	conn, err := establishTunnel(w, r, nil, extra)
	if err != nil {
		tun.rec.end = "establishing: " + err.Error()
		return
	}
	defer reverse.Finish(conn)
	if alpn == "h2" {
		tun.rec.semantics = "multiplexed"
		h.serveH2(ctx, tun, conn)
		return
	}
	tun.rec.semantics = "accept"
	h.idle.Put(conn)
	idle := time.NewTimer(h.opts.IdleTimeout)
	defer idle.Stop()
	for {
		select {
		case <-conn.Done():
			return
		case <-ctx.Done():
			h.idle.Remove(conn)
			wire.Abort(conn, wire.AbortCode(context.Cause(ctx)))
			return
		case <-idle.C:
			if h.idle.Remove(conn) { // nobody took it: close it; the app opens another
				tun.rec.end = "idle for " + h.opts.IdleTimeout.String()
				_ = conn.Close()
				return
			}
			// In use by the transport, which closes it when it idles.
		}
	}
}

func accessOf(devicesOnly bool) string {
	if devicesOnly {
		return "enrolled devices only"
	}
	return "anyone"
}

// ReverseHTTPDevicesOnly reports whether the reverse name host is held by
// tunnels whose exposer lets only enrolled devices reach it (TP-Access: devices).
func (s *Server) ReverseHTTPDevicesOnly(host string) bool {
	if s.rev == nil {
		return false
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	a, ok := s.reverseAccess(strings.TrimSuffix(strings.ToLower(host), "."))
	return ok && a.devicesOnly
}

// reverseAccess is the access of the name's holder now, or of the one whose
// last tunnel just closed; false when neither.
func (s *Server) reverseAccess(host string) (holderAccess, bool) {
	if h := s.rev.tunnels.holder(host); h != nil {
		return h.access(), h.target.Port == 0 // a public port's holder serves no name
	}
	g, ok := s.rev.tunnels.recentlyGone(host)
	return g.access, ok
}

// ReverseHTTP returns the round-tripper for a reverse name that reverse tunnels
// serve (LABEL.<reverse-zone>, a port is ignored), or false when none does now.
// It sends each request down one of the name's tunnels: an h2 tunnel with room
// for another stream, else an HTTP/1.1 tunnel from the pool (waiting up to
// ReverseOptions.PickupTimeout for one). The request's URL is rewritten to
// http://host; its Host field is kept. A tunnel that dies mid-response fails
// the body's Read: nothing is cut short silently.
//
// The round-tripper keeps the access the name had when it was made (its
// DevicesOnly method): a caller checks the request against that, and the
// round-tripper sends it only to tunnels that have the same.
func (s *Server) ReverseHTTP(host string) (http.RoundTripper, bool) {
	if s.rev == nil {
		return nil, false
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if _, ok := s.rev.Name(host); !ok {
		return nil, false
	}
	access, ok := s.reverseAccess(host)
	if !ok {
		return nil, false
	}
	return &reverseRoundTripper{s: s, host: host, access: access}, true
}

type reverseRoundTripper struct {
	s      *Server
	host   string
	access holderAccess // the holder's when the round-tripper was made
}

// DevicesOnly reports whether the name was open to enrolled devices only
// when the round-tripper was made: what a request must be checked against.
func (rt *reverseRoundTripper) DevicesOnly() bool { return rt.access.devicesOnly }

// errTunnelsGone is why a request waiting for an HTTP/1.1 tunnel got none:
// the name's last tunnel closed meanwhile (closed idle, say, as its exposer
// opens the next one), before anything of the request was sent.
var errTunnelsGone = errors.New("the reverse tunnels of the name closed while the request waited for one")

// RoundTrip sends req down one of the name's tunnels. A request whose
// tunnels all closed before it was sent goes to the tunnels that hold the
// name next, if any do within the pickup time: an exposer replaces a tunnel
// TP closed idle at once, and a request arriving at that moment should not
// fail.
func (rt *reverseRoundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	var body *heldBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &heldBody{rc: req.Body}
		req = req.Clone(req.Context())
		req.Body = body
	}
	resp, err := rt.roundTrip(req, body)
	if body != nil {
		body.last()
		if err != nil {
			body.close()
		}
	}
	return resp, err
}

func (rt *reverseRoundTripper) roundTrip(req *http.Request, body *heldBody) (*http.Response, error) {
	until := time.Now().Add(rt.s.rev.opts.PickupTimeout)
	var h *tunnelHolder
	for {
		next, err := rt.nextHolder(req.Context(), h, until)
		if err != nil {
			return nil, err
		}
		h = next
		resp, err := rt.via(h, req)
		if err == nil || !errors.Is(err, errTunnelsGone) || body != nil && body.read.Load() {
			return resp, err
		}
		// The holder's last tunnel closed before the request went out.
	}
}

// heldBody is a request body that a failed attempt closes only when it read
// from it: a request whose tunnel vanished before any of it was sent can go
// again, body and all. After the last attempt a Close is a Close.
type heldBody struct {
	rc               io.ReadCloser
	read, done, shut atomic.Bool // read from; no attempt follows; closed when asked
	once             sync.Once
}

func (b *heldBody) Read(p []byte) (int, error) {
	b.read.Store(true)
	return b.rc.Read(p)
}

func (b *heldBody) Close() error {
	if b.read.Load() || b.done.Load() {
		b.close()
		return nil
	}
	b.shut.Store(true)
	if b.done.Load() { // the last attempt ended meanwhile
		b.close()
	}
	return nil
}

// last says no attempt follows: a Close asked for before is carried out.
func (b *heldBody) last() {
	b.done.Store(true)
	if b.shut.Load() {
		b.close()
	}
}

func (b *heldBody) close() { b.once.Do(func() { _ = b.rc.Close() }) }

// nextHolder returns the name's holder other than old, waiting for one until
// then or until ctx ends while the name's last holder is remembered as just
// gone (its last tunnel closed, and the exposer is opening the next). A holder
// of another device, or one that serves the name to other people than the
// request was let in for, is an error: the request was authorized for the
// access the name had when rt was made.
func (rt *reverseRoundTripper) nextHolder(ctx context.Context, old *tunnelHolder, until time.Time) (*tunnelHolder, error) {
	var timer *time.Timer
	for {
		h, joined := rt.s.rev.tunnels.current(rt.host)
		if h != nil && h != old {
			if h.access() != rt.access {
				return nil, fmt.Errorf("%s is served by other reverse tunnels now, with other access, than when the request arrived; send it again", rt.host)
			}
			return h, nil
		}
		_, gone := rt.s.rev.tunnels.recentlyGone(rt.host)
		switch {
		case h == nil && !gone && old == nil:
			return nil, fmt.Errorf("no reverse tunnel serves %s now (is `tp expose --http` running for it?)", rt.host)
		case h == nil && !gone:
			return nil, fmt.Errorf("no reverse tunnel serves %s here now: its last one closed while the request waited for it (is `tp expose --http` still running for it?)", rt.host)
		case !time.Now().Before(until):
			return nil, fmt.Errorf("no reverse tunnel serves %s now: its last one closed, and no other opened while the request waited (is `tp expose --http` still running for it?)", rt.host)
		}
		if timer == nil {
			timer = time.NewTimer(time.Until(until))
			defer timer.Stop()
		}
		select {
		case <-joined:
		case <-timer.C:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
}

// via sends req down one of h's tunnels.
func (rt *reverseRoundTripper) via(h *tunnelHolder, req *http.Request) (*http.Response, error) {
	out := req.Clone(req.Context())
	u := *req.URL
	u.Scheme, u.Host = "http", rt.host
	out.URL, out.RequestURI = &u, ""
	if isUpgrade(out.Header) { // h2 cannot carry an Upgrade: only HTTP/1.1 tunnels can
		// A holder that has only just started may not have said yet what
		// its tunnels speak: the pool's wait decides then.
		if h.h1Tunnels.Load() == 0 && (len(h.h2.Snapshot()) > 0 || h.h2Pending.Load() > 0) {
			if req.Body != nil {
				_ = req.Body.Close()
			}
			return nil, fmt.Errorf("%s is served over h2 reverse tunnels, which cannot carry an Upgrade (WebSocket) request; expose it with `tp expose --http --http1` for WebSockets", rt.host)
		}
		return h.h1.RoundTrip(out)
	}
	deadline := time.NewTimer(h.pickup)
	defer deadline.Stop()
	for {
		changed := h.h2.Changed()
		ccs := h.h2.Snapshot()
		for _, cc := range ccs {
			if cc.ReserveNewRequest() {
				return cc.RoundTrip(out)
			}
		}
		if cc := firstOpen(ccs); cc != nil && h.h1Tunnels.Load() == 0 {
			return cc.RoundTrip(out) // it waits for a free stream
		}
		if h.h2Pending.Load() == 0 {
			return h.h1.RoundTrip(out)
		}
		select { // an h2 tunnel is being set up: wait for it
		case <-changed:
		case <-deadline.C:
			return h.h1.RoundTrip(out)
		case <-req.Context().Done():
			if req.Body != nil {
				_ = req.Body.Close()
			}
			return nil, context.Cause(req.Context())
		}
	}
}

// firstOpen is the first of ccs that is neither closed nor closing: a tunnel
// that an exposer just gave up (or whose set-up failed) may still be in the
// pool's snapshot, and a request sent to it fails without reaching the app.
func firstOpen(ccs []*http2.ClientConn) *http2.ClientConn {
	for _, cc := range ccs {
		if st := cc.State(); !st.Closed && !st.Closing {
			return cc
		}
	}
	return nil
}

// listenReq is a listen-tcp tunnel request waiting for a connection.
type listenReq struct {
	match chan *tcpMatch
}

type tcpMatch struct {
	peer, by string
	reply    chan reverse.TunnelConn // the established tunnel, or nil
}

// serveListenTunnel serves a listen-tcp tunnel: accept semantics (a request
// per connection, answered when one arrives) or, when it chose h2, bind
// semantics (a CONNECT per connection over one tunnel).
func (s *Server) serveListenTunnel(ctx context.Context, w http.ResponseWriter, r *http.Request, h *tunnelHolder, tun *tunnelTicket, alpn string) {
	if alpn == "h2" {
		tun.rec.semantics = "bind"
		conn, err := establishTunnel(w, r, nil, http.Header{"Selected-Alpn": {"h2"}})
		if err != nil {
			tun.rec.end = "establishing: " + err.Error()
			return
		}
		defer reverse.Finish(conn)
		h.serveH2(ctx, tun, conn)
		return
	}
	tun.rec.semantics = "accept"
	var hj *reverse.Hijacked
	if r.ProtoMajor == 1 {
		var err error
		if hj, err = reverse.Hijack(w); err != nil {
			tun.rec.end = "hijack: " + err.Error()
			return
		}
	}
	informational := func(status string) error {
		if hj != nil {
			_ = hj.Conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
			_, err := hj.Conn.Write([]byte("HTTP/1.1 " + status + "\r\n\r\n"))
			_ = hj.Conn.SetWriteDeadline(time.Time{})
			return err
		}
		w.WriteHeader(http.StatusContinue)
		return nil
	}
	lr := &listenReq{match: make(chan *tcpMatch)}
	h.listen.Put(lr)
	wait := time.NewTimer(h.opts.ListenWait)
	defer wait.Stop()
	tick := time.NewTicker(h.opts.ListenWait / 4)
	defer tick.Stop()
	var m *tcpMatch
	for m == nil {
		select {
		case m = <-lr.match:
		case <-tick.C:
			if err := informational("100 Continue"); err != nil {
				if !h.listen.Remove(lr) {
					m = <-lr.match
					m.reply <- nil
				}
				tun.rec.end = "sending 100 (Continue): " + err.Error()
				if hj != nil {
					_ = hj.Conn.Close()
				}
				return
			}
			continue
		case <-wait.C:
		case <-ctx.Done():
		}
		if m == nil && !h.listen.Remove(lr) {
			m = <-lr.match // an opener took it just now
		}
		if m == nil {
			if ctx.Err() != nil {
				tun.rec.end = context.Cause(ctx).Error()
				if hj != nil {
					_ = hj.Conn.Close()
				}
				return
			}
			tun.rec.end = "no connection within " + h.opts.ListenWait.String() + " (204)"
			if hj != nil {
				_ = informational("204 No Content\r\nConnection: close")
				_ = hj.Conn.Close()
				return
			}
			w.WriteHeader(http.StatusNoContent)
			return
		}
	}
	conn, err := establishTunnel(w, r, hj, http.Header{"Forwarded": {reverse.Forwarded(m.peer, m.by)}})
	if err != nil {
		m.reply <- nil
		tun.rec.end = "establishing: " + err.Error()
		return
	}
	tun.rec.uses.Add(1)
	m.reply <- conn
	defer reverse.Finish(conn)
	select {
	case <-conn.Done():
	case <-ctx.Done():
		wire.Abort(conn, wire.AbortCode(context.Cause(ctx)))
	}
}

// openTCPTunnel hands a public connection to the holder of a listen-tcp port:
// a CONNECT on a bound h2 tunnel, else a waiting tunnel request.
func (s *Server) openTCPTunnel(ctx context.Context, h *tunnelHolder, hdr wire.SessionHeader) (wire.Stream, *wire.HelloError) {
	by := s.rev.PublicAddr(h.key)
	deadline := time.NewTimer(h.pickup)
	defer deadline.Stop()
	for {
		changed := h.h2.Changed()
		ccs := h.h2.Snapshot()
		for _, cc := range ccs {
			if cc.ReserveNewRequest() {
				return reverse.BindConnect(ctx, cc, h.target, h.pickup, hdr.PeerAddr, by)
			}
		}
		if len(ccs) > 0 {
			return reverse.BindConnect(ctx, ccs[0], h.target, h.pickup, hdr.PeerAddr, by) // it waits for a free stream
		}
		if h.h2Pending.Load() == 0 {
			break
		}
		select { // a bound tunnel is being set up: wait for it
		case <-changed:
			continue
		case <-deadline.C:
		case <-ctx.Done():
		}
		break
	}
	lr, ok := h.listen.Take(ctx, h.pickup, h.ctx.Done())
	if !ok {
		return nil, wire.Errorf(wire.CodeReverseTimeout, "no reverse tunnel request waited for %s within %s", h.target, h.pickup)
	}
	m := &tcpMatch{peer: hdr.PeerAddr, by: by, reply: make(chan reverse.TunnelConn, 1)}
	lr.match <- m
	conn := <-m.reply
	if conn == nil {
		return nil, wire.Errorf(wire.CodeReverseOffline, "the reverse tunnel for %s went away", h.target)
	}
	return conn, nil
}
