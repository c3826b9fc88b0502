package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

var errNoWeb = errors.New("this server only accepts ALPN \"tp/1\"")

// ALPNACME is the ALPN protocol of ACME tls-alpn-01 validation (RFC 8737). Such a
// handshake is answered by the website configuration (whose GetCertificate must
// return the challenge certificate) and closed right after.
const ALPNACME = "acme-tls/1"

// PassthroughFunc is Config.Passthrough: for a server name (SNI, lower case,
// without a trailing dot) it returns the handler of a name registered for public
// pass-through, and ok. The handler gets the client's TCP connection with the
// ClientHello still unread (TLS is not terminated: the backend does the
// handshake), owns it and must close it; ctx ends when the server is shut down
// (after draining) or Serve's context ends. The handler runs on the connection's
// goroutine and the connection counts against MaxConns until it returns. conn
// implements CloseWrite when the listener gives TCP connections.
//
// It is consulted for every ClientHello on TCP that carries a server name, before
// ALPN is looked at, so it must answer quickly (a map lookup) and must never claim
// the proxy's own names or the websites' names: those would stop reaching tpd.
type PassthroughFunc func(serverName string) (handler func(ctx context.Context, conn net.Conn), ok bool)

// errPassthrough ends the TLS handshake of a connection routed to a pass-through handler.
var errPassthrough = errors.New("routed to pass-through")

// configForClient routes by ALPN: a ClientHello offering "tp/1" gets the proxy
// configuration (TLS 1.3, verified client certificate); a proxy name the
// HTTPS proxy's; anything else the website's, which asks for a client
// certificate only for a devices-only name (Config.DevicesOnly). A website name
// that Config.WebNames refuses gets a configuration without a certificate,
// which fails the handshake with the alert unrecognized_name.
func (s *Server) configForClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	if pc, ok := hello.Conn.(*peekConn); ok {
		// A proxy name is never passed through, whatever Passthrough says.
		if h, ok := s.passthrough(hello.ServerName); ok && !s.isProxyName(hello.ServerName) {
			pc.handler = h
			pc.mute.Store(true) // the alert crypto/tls sends now must not reach the client
			return nil, errPassthrough
		}
		pc.stopRecording()
	}
	if s.peerTLS != nil && slices.Contains(hello.SupportedProtos, wire.PeerALPN) {
		return s.peerTLS, nil // another instance (peer.go): node certificates only
	}
	if !s.cfg.NoTLSMux && slices.Contains(hello.SupportedProtos, wire.ALPNMux) {
		s.tickets.rotate()
		return s.muxTLS, nil // tp-mux/1 when offered, else tp/1 (tlsmux.go)
	}
	if slices.Contains(hello.SupportedProtos, wire.ALPN) {
		s.tickets.rotate()
		return s.proxyTLS, nil
	}
	if slices.Contains(hello.SupportedProtos, wire.ALPNCarrier) {
		s.tickets.rotate()
		return s.carrierTLS, nil
	}
	if s.connectTLS != nil && s.isProxyName(hello.ServerName) {
		s.tickets.rotate()
		return s.connectTLS, nil
	}
	if s.webTLS == nil {
		return nil, errNoWeb
	}
	if s.cfg.WebNames != nil && !s.cfg.WebNames(hello.ServerName) {
		return s.unknownName, nil
	}
	s.tickets.rotate()
	// A tls-alpn-01 validation (RFC 8737 §3: only "acme-tls/1" offered) of a
	// devices-only name is the CA's, which has no device certificate: it gets
	// the website's configuration, which answers with the challenge
	// certificate, and the connection ends with the handshake.
	if s.isDevicesOnly(hello.ServerName) && !(len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == ALPNACME) {
		return s.devicesTLS, nil
	}
	return s.webTLS, nil
}

// isDevicesOnly reports whether serverName is a website name open to enrolled
// devices only (Config.DevicesOnly): its handshake requires the device
// certificate, while its requests go to the website like any other name's.
func (s *Server) isDevicesOnly(serverName string) bool {
	if s.devicesTLS == nil || serverName == "" {
		return false
	}
	return s.cfg.DevicesOnly(strings.TrimSuffix(strings.ToLower(serverName), "."))
}

func (s *Server) passthrough(serverName string) (func(context.Context, net.Conn), bool) {
	name := strings.TrimSuffix(strings.ToLower(serverName), ".")
	if name == "" {
		return nil, false
	}
	return s.cfg.Passthrough(name)
}

// handle owns one accepted connection: handshake, then proxy session, hand-off
// to the website, or pass-through.
//
// An idle proxy session parks on this goroutine for as long as it lives, and a
// goroutine's stack keeps the size it grew to until the garbage collector shrinks
// it (one halving per cycle, and only while it uses less than a quarter). So the
// deep work runs on short-lived goroutines (handshake here, the request's set-up
// in serveStream), and the frames that stay below an idle session (this one,
// serveProxy, serveStream, relay, Bridge) are kept small.
func (s *Server) handle(ctx context.Context, raw net.Conn, handshakeDone func()) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stop := context.AfterFunc(s.force, func() { cancel(wire.ErrShutdown) })
	defer stop()

	// EOFConn tells a TLS session that ends without close_notify (its peer died
	// or was cut off) from a clean end (abort.go).
	raw = wire.NewEOFConn(raw)
	var pc *peekConn
	if s.cfg.Passthrough != nil {
		pc = &peekConn{Conn: raw, recording: true}
		raw = pc
	}
	conn := tls.Server(raw, s.tls)
	err, timedOut := s.handshake(ctx, conn)
	handshakeDone()
	if pc != nil && pc.handler != nil && !timedOut {
		// Not conn.Close: that would close the socket the handler now owns.
		defer s.release()
		pc.handler(ctx, pc.replay())
		return
	}
	if err != nil {
		s.stats.handshakeFailed(handshakeReason(err, timedOut))
		s.handshakeFailed(ctx, raw, err)
		return
	}
	switch proto := negotiatedProtocol(conn); proto {
	case wire.ALPN:
		defer s.release()
		s.stats.proxyConns[0].Add(1)
		if conn.ConnectionState().DidResume {
			s.stats.resumedConns[0].Add(1)
		}
		s.serveProxy(ctx, conn)
	case wire.ALPNMux:
		defer s.release()
		s.stats.proxyConns[0].Add(1)
		if conn.ConnectionState().DidResume {
			s.stats.resumedConns[0].Add(1)
		}
		s.serveMux(ctx, conn)
	case wire.PeerALPN:
		defer s.release()
		s.servePeer(ctx, conn)
	case wire.ALPNCarrier:
		defer s.release()
		s.serveCarrierTLS(ctx, conn)
	case "", "h2", "http/1.1":
		if s.connect != nil && s.isProxyName(conn.ConnectionState().ServerName) {
			s.handoffProxyHTTP(conn)
			return
		}
		if s.web == nil { // unreachable: configForClient refuses non-tp handshakes
			s.release()
			_ = conn.Close()
			return
		}
		if !s.toWeb(raw.RemoteAddr().String()) {
			s.stats.session("tls", "web", "refused", 0, 0)
			_ = conn.Close()
			return
		}
		s.stats.session("tls", "web", "ok", 0, 0)
		s.web.handoff(conn) // http.Server now owns conn and its MaxWebConns slot
	default: // e.g. acme-tls/1: the handshake itself was the whole exchange
		s.release()
		_ = conn.Close()
	}
}

// handshake runs the TLS handshake within HandshakeTimeout, on a goroutine of its
// own (see handle). timedOut says the bound (or ctx) ended it, in which case the
// socket may have been closed under it.
func (s *Server) handshake(ctx context.Context, conn *tls.Conn) (err error, timedOut bool) {
	hctx, hcancel := context.WithTimeout(ctx, s.lim().HandshakeTimeout)
	defer hcancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		err = conn.HandshakeContext(hctx)
	}()
	<-done
	return err, hctx.Err() != nil
}

// handshakeFailed gives back the slot of a connection whose handshake failed,
// closes it and logs why.
func (s *Server) handshakeFailed(ctx context.Context, raw net.Conn, err error) {
	s.release()
	_ = raw.Close()
	msg := "tls handshake failed"
	if strings.Contains(err.Error(), "no certificates configured") { // s.unknownName
		msg = "tls handshake refused: no site is configured for this server name"
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, msg,
		slog.String("remote", raw.RemoteAddr().String()), slog.String("err", err.Error()))
}

// negotiatedProtocol is conn's ALPN protocol, without a ConnectionState in the
// caller's frame.
//
//go:noinline
func negotiatedProtocol(conn *tls.Conn) string { return conn.ConnectionState().NegotiatedProtocol }

// peekConn records what the TLS handshake reads until the route is known, so a
// pass-through handler can replay the ClientHello to its backend. Once the route is
// the proxy or the website it records nothing and only forwards.
type peekConn struct {
	net.Conn
	recording bool // handshake goroutine only, before configForClient returns
	buf       []byte
	mute      atomic.Bool // set when routed to pass-through: drop crypto/tls's alert
	handler   func(context.Context, net.Conn)
}

func (p *peekConn) Read(b []byte) (int, error) {
	n, err := p.Conn.Read(b)
	if p.recording && n > 0 {
		if len(p.buf)+n > maxPeek {
			p.recording = false // more than any ClientHello: not pass-through material
			p.buf = nil
		} else {
			p.buf = append(p.buf, b[:n]...)
		}
	}
	return n, err
}

// maxPeek bounds the bytes recorded for a pass-through replay: a ClientHello is at
// most 64 KiB plus record headers.
const maxPeek = 1<<16 + 1<<10

func (p *peekConn) Write(b []byte) (int, error) {
	if p.mute.Load() {
		return len(b), nil
	}
	return p.Conn.Write(b)
}

// Unwrap is the connection below.
func (p *peekConn) Unwrap() net.Conn { return p.Conn }

func (p *peekConn) stopRecording() { p.recording, p.buf = false, nil }

// replay returns the connection for a pass-through handler: the recorded bytes,
// then the socket.
func (p *peekConn) replay() net.Conn {
	p.recording = false
	_ = p.Conn.SetDeadline(time.Time{})
	return &replayConn{Conn: p.Conn, pending: p.buf}
}

type replayConn struct {
	net.Conn
	pending []byte
}

// Unwrap is the socket.
func (r *replayConn) Unwrap() net.Conn { return r.Conn }

func (r *replayConn) Read(b []byte) (int, error) {
	if len(r.pending) > 0 {
		n := copy(b, r.pending)
		r.pending = r.pending[n:]
		return n, nil
	}
	return r.Conn.Read(b)
}

// CloseWrite half-closes the socket, when it can.
func (r *replayConn) CloseWrite() error {
	if cw, ok := r.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("this connection cannot half-close")
}

// ticketKeys gives the proxy and the website separate session-ticket keys, so a
// ticket the website issued can never resume a proxy session (and the reverse).
// crypto/tls would otherwise use the listener configuration's keys for both. Keys
// rotate daily and stay valid for a week, like crypto/tls's own. With a
// TicketKeySource (several instances on one database) the keys come from it, so
// that a ticket from one instance resumes on another.
type ticketKeys struct {
	mu       sync.Mutex
	next     atomic.Int64 // unix nanoseconds of the next rotation (or refresh)
	sets     []*ticketSet
	disable  bool
	src      TicketKeySource
	log      *slog.Logger
	fetching atomic.Bool
}

type ticketSet struct {
	name string
	cfgs []*tls.Config
	keys [][32]byte
}

// TicketKeySource shares TLS session-ticket keys among the instances behind one
// name. Sets are "proxy", "proxy-names", "website" and "devices-only", which
// never share keys.
type TicketKeySource interface {
	// TicketKeys returns the keys of set, newest first, at most keep: it first
	// adds a fresh random key when the newest is older than rotate (or there is
	// none). age is the newest key's age.
	TicketKeys(ctx context.Context, set string, rotate time.Duration, keep int) (keys [][32]byte, age time.Duration, err error)
}

const (
	ticketRotation = 24 * time.Hour
	ticketKeep     = 7
	// With a TicketKeySource, each instance fetches the keys every
	// ticketRefresh, and a new key encrypts tickets only once it is
	// ticketActivation old, when every instance knows it and can decrypt them.
	ticketRefresh    = time.Minute
	ticketActivation = 2*ticketRefresh + 30*time.Second
	ticketFetch      = 10 * time.Second
)

// add gives cfgs (which share tickets with each other) their own key set.
func (t *ticketKeys) add(name string, cfgs ...*tls.Config) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sets = append(t.sets, &ticketSet{name: name, cfgs: cfgs})
	t.next.Store(0)
}

// start installs the first keys: from the source when there is one (falling
// back to local keys, which resume only on this instance, if it fails).
func (t *ticketKeys) start() {
	if t.src != nil {
		t.next.Store(time.Now().Add(ticketRefresh).UnixNano())
		t.refresh()
		return
	}
	t.rotate()
}

// rotate installs a fresh key for every set when the current one is a day old;
// with a source it starts a refresh in the background every ticketRefresh.
func (t *ticketKeys) rotate() {
	now := time.Now().UnixNano()
	if now < t.next.Load() {
		return
	}
	if t.src != nil {
		if t.fetching.CompareAndSwap(false, true) {
			t.next.Store(now + int64(ticketRefresh))
			go func() {
				defer t.fetching.Store(false)
				t.refresh()
			}()
		}
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if now < t.next.Load() {
		return
	}
	for _, set := range t.sets {
		t.localRotate(set)
	}
	t.next.Store(now + int64(ticketRotation))
}

// localRotate puts a fresh random key in front of set's keys. t.mu is held.
func (t *ticketKeys) localRotate(set *ticketSet) {
	var k [32]byte
	_, _ = rand.Read(k[:])
	set.keys = append([][32]byte{k}, set.keys...)
	if len(set.keys) > ticketKeep {
		set.keys = set.keys[:ticketKeep]
	}
	for _, c := range set.cfgs {
		c.SetSessionTicketKeys(set.keys)
	}
}

// refresh fetches every set's keys from the source and installs them. A set
// whose fetch fails keeps its keys (or, having none yet, gets a local one).
func (t *ticketKeys) refresh() {
	t.mu.Lock()
	sets := slices.Clone(t.sets)
	t.mu.Unlock()
	for _, set := range sets {
		ctx, cancel := context.WithTimeout(context.Background(), ticketFetch)
		keys, age, err := t.src.TicketKeys(ctx, set.name, ticketRotation, ticketKeep)
		cancel()
		if err == nil && len(keys) == 0 {
			err = errors.New("no keys")
		}
		t.mu.Lock()
		if err != nil {
			t.log.Warn("session-ticket keys from the database unavailable; tickets from other instances may not resume", "set", set.name, "err", err)
			if len(set.keys) == 0 {
				t.localRotate(set)
			}
			t.mu.Unlock()
			continue
		}
		if age < ticketActivation && len(keys) > 1 {
			keys[0], keys[1] = keys[1], keys[0] // decrypt with the new key, encrypt with the previous one yet
		}
		set.keys = keys
		for _, c := range set.cfgs {
			c.SetSessionTicketKeys(keys)
		}
		t.mu.Unlock()
	}
}

// webServer runs an http.Server over connections that were already handshaken by
// the shared listener. http.Server recognises *tls.Conn and dispatches "h2" to its
// built-in HTTP/2 server through TLSNextProto, so both protocols work. h3 serves
// the same handler on QUIC connections that negotiated "h3" (quic.go).
type webServer struct {
	srv     *http.Server
	h3      *h3Server
	ln      *chanListener
	once    sync.Once
	release func()
	quic    atomic.Bool // HTTP/3 is being served: advertise it with Alt-Svc
}

func newWebServer(h http.Handler, log *slog.Logger, release func()) *webServer {
	w := &webServer{ln: newChanListener(), release: release}
	errLog := slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	w.srv = &http.Server{
		Handler:           w.altSvc(bodyIdleTimeout(h)),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          errLog,
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateClosed || st == http.StateHijacked {
				release()
			}
		},
	}
	w.h3 = newH3Server(&http3.Server{
		Handler:        bodyIdleTimeout(h),
		MaxHeaderBytes: 64 << 10,
		IdleTimeout:    2 * time.Minute,
		Logger:         log,
	})
	return w
}

// webBodyIdle is how long a request body may send nothing before the request
// fails: a client that announces a body and goes quiet must not hold a connection
// (and its slot) for ever, while a slow but moving upload is never cut.
var webBodyIdle atomic.Int64 // nanoseconds; 30 s (tests shorten it)

func init() { webBodyIdle.Store(int64(30 * time.Second)) }

// bodyIdleTimeout puts a read deadline on each request body that moves forward
// whenever body bytes arrive.
func bodyIdleTimeout(h http.Handler) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if r.Body != nil && r.Body != http.NoBody {
			rc := http.NewResponseController(rw)
			if rc.SetReadDeadline(time.Now().Add(time.Duration(webBodyIdle.Load()))) == nil {
				r.Body = &idleBody{ReadCloser: r.Body, rc: rc}
			}
		}
		h.ServeHTTP(rw, r)
	})
}

type idleBody struct {
	io.ReadCloser
	rc *http.ResponseController
}

func (b *idleBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		_ = b.rc.SetReadDeadline(time.Now().Add(time.Duration(webBodyIdle.Load())))
	}
	return n, err
}

// altSvc tells HTTP/1.1 and h2 clients that the site also speaks HTTP/3 on the
// same port over UDP. The port is the one the client used (from Host), which is
// right behind a port mapping that maps TCP and UDP alike.
func (w *webServer) altSvc(h http.Handler) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if w.quic.Load() {
			port := "443"
			if _, p, err := net.SplitHostPort(r.Host); err == nil && p != "" {
				port = p
			}
			rw.Header().Set("Alt-Svc", `h3=":`+port+`"; ma=86400`)
		}
		h.ServeHTTP(rw, r)
	})
}

func (w *webServer) start() {
	w.once.Do(func() { go func() { _ = w.srv.Serve(w.ln) }() })
}

func (w *webServer) handoff(c *tls.Conn) {
	if !w.ln.put(c) {
		_ = c.Close()
		w.release()
	}
}

func (w *webServer) shutdown(ctx context.Context) error { return shutdownHTTP(ctx, w.ln, w.srv, w.h3) }

// shutdownHTTP stops feeding ln and shuts srv and h3 down together within ctx,
// closing whichever did not finish in time.
func shutdownHTTP(ctx context.Context, ln *chanListener, srv *http.Server, h3 *h3Server) error {
	ln.Close()
	h3Done := make(chan error, 1)
	go func() { h3Done <- h3.shutdown(ctx) }()
	err := srv.Shutdown(ctx)
	if err != nil {
		_ = srv.Close()
	}
	if h3err := <-h3Done; h3err != nil {
		_ = h3.Close()
		if err == nil {
			err = h3err
		}
	}
	return err
}

// h3IdleGrace is how long a shutdown lets HTTP/3 clients with no request in
// flight close their connections themselves after the GOAWAY, as net/http's
// HTTP/2 server lets idle clients after its own GOAWAY (one second).
const h3IdleGrace = time.Second

// h3Server is an HTTP/3 server that counts the requests it is handling. Its
// graceful shutdown (http3.Server.Shutdown) waits for the clients to close
// their connections after the GOAWAY: a client that went away without closing
// (a phone that lost the network, a connection that migrated to another
// instance) would hold it until ctx ends — the whole drain, with nothing to
// drain. So it ends once no request has been in flight for h3IdleGrace, and
// closes what is left, as HTTP/1.1 and HTTP/2 close their idle connections.
type h3Server struct {
	*http3.Server
	busy atomic.Int64 // requests being handled
	own  *h3Own       // the connections served with RawServerConn (serveH3Proxy); nil when none are
}

func newH3Server(s *http3.Server) *h3Server {
	h := &h3Server{Server: s}
	next := s.Handler
	s.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.busy.Add(1)
		defer h.busy.Add(-1)
		next.ServeHTTP(w, r)
	})
	return h
}

// Close is http3.Server.Close; it also closes the connections it does not
// know of (h3Own).
func (h *h3Server) Close() error {
	if h.own != nil {
		h.own.endGrac()
		h.own.close()
	}
	return h.Server.Close()
}

// shutdown is http3.Server.Shutdown, ended early once no request has been in
// flight for h3IdleGrace; it returns ctx's error only when ctx ended it.
func (h *h3Server) shutdown(ctx context.Context) error {
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		tick := time.NewTicker(h3IdleGrace / 10)
		defer tick.Stop()
		idleSince := time.Now()
		for {
			select {
			case <-sctx.Done():
				return
			case now := <-tick.C:
				if h.busy.Load() > 0 {
					idleSince = now
				} else if now.Sub(idleSince) >= h3IdleGrace {
					stop()
					return
				}
			}
		}
	}()
	err := h.Shutdown(sctx)
	if h.own != nil {
		h.own.drain(sctx)
	}
	if ctx.Err() == nil {
		return nil // ended early: Shutdown closed the idle connections
	}
	return err
}

// chanListener is a net.Listener fed by handoff.
type chanListener struct {
	ch        chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func newChanListener() *chanListener {
	return &chanListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) put(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return chanAddr{} }

type chanAddr struct{}

func (chanAddr) Network() string { return "tp" }
func (chanAddr) String() string  { return "tp-web" }

// initDemux sets up what configForClient and quicConfigForClient hand out.
func (s *Server) initDemux() {
	// No certificate at all: crypto/tls then fails the handshake with unrecognized_name.
	s.unknownName = &tls.Config{MinVersion: tls.VersionTLS12}
	s.quicTLS = &tls.Config{GetConfigForClient: s.quicConfigForClient}
	s.tickets.src, s.tickets.log = s.cfg.TicketKeys, s.log
	s.tickets.add("proxy", s.proxyTLS, s.carrierTLS, s.muxTLS)
	if s.connectTLS != nil {
		s.tickets.add("proxy-names", s.connectTLS, s.connectH3TLS)
	}
	if s.webTLS != nil {
		s.h3TLS = s.webTLS.Clone()
		s.h3TLS.NextProtos = []string{http3.NextProtoH3}
		s.tickets.add("website", s.webTLS, s.h3TLS)
	}
	if s.devicesTLS != nil {
		// Their own keys: a ticket from a public name's handshake, which had no
		// certificate, must never resume a devices-only one.
		s.tickets.add("devices-only", s.devicesTLS, s.devicesH3TLS)
	}
	s.tickets.start()
}

// quicConfigForClient is configForClient for QUIC: "tp/1" → the proxy, "h3" → the
// website over HTTP/3. ServeQUIC dispatches on the negotiated protocol.
func (s *Server) quicConfigForClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	s.tickets.rotate()
	if s.connectH3TLS != nil && !slices.Contains(hello.SupportedProtos, wire.ALPN) && slices.Contains(hello.SupportedProtos, http3.NextProtoH3) && s.isProxyName(hello.ServerName) {
		return s.connectH3TLS, nil
	}
	if s.h3TLS == nil || slices.Contains(hello.SupportedProtos, wire.ALPN) || !slices.Contains(hello.SupportedProtos, http3.NextProtoH3) {
		return s.proxyTLS, nil // fails with no_application_protocol unless "tp/1" is offered
	}
	if s.cfg.WebNames != nil && !s.cfg.WebNames(hello.ServerName) {
		return s.unknownName, nil
	}
	if s.isDevicesOnly(hello.ServerName) {
		return s.devicesH3TLS, nil
	}
	return s.h3TLS, nil
}

// serveH3 serves one QUIC connection that negotiated "h3" with h3 (the
// website's or the proxy names') until it ends; ctx ending closes it.
func (s *Server) serveH3(ctx context.Context, conn *quic.Conn, h3 *http3.Server, what string) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopForce := context.AfterFunc(s.force, cancel)
	defer stopForce()
	stop := context.AfterFunc(ctx, func() {
		_ = conn.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "server shutting down")
	})
	defer stop()
	err := h3.ServeQUICConn(conn)
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		s.log.LogAttrs(ctx, slog.LevelDebug, what+" connection ended",
			slog.String("remote", conn.RemoteAddr().String()), slog.String("err", err.Error()))
	}
	_ = conn.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "")
}

// refuseUniStreams stops every unidirectional stream a "tp/1" peer opens: the
// protocol uses none, but the QUIC listener must allow a few for HTTP/3.
func refuseUniStreams(conn *quic.Conn) {
	for {
		str, err := conn.AcceptUniStream(conn.Context())
		if err != nil {
			return
		}
		str.ReleaseStreamCredit()
		str.CancelRead(quic.StreamErrorCode(wire.QUICRefused))
	}
}
