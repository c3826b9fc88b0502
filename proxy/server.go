package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/internal/lib/udpgro"
	"github.com/tp-proxy/tp/proxy/carrier"
	"github.com/tp-proxy/tp/proxy/masque"
	"github.com/tp-proxy/tp/proxy/peer"
	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"

	"github.com/quic-go/quic-go/http3"
)

// Resolver turns a host name into addresses. *net.Resolver implements it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

var _ Resolver = (*net.Resolver)(nil)

// Config configures a Server. ProxyTLS, Identify and Authorizer are required.
type Config struct {
	// NoTLSMux serves "tp/1" only, as a tpd before tp-mux/1 did: a client
	// offering "tp-mux/1" gets a connection per session (tlsmux.go).
	NoTLSMux bool
	// ProxyTLS is used for handshakes that offer ALPN "tp/1". The caller sets the
	// certificate (Certificates or GetCertificate), ClientCAs and ClientAuth, which
	// must be tls.RequireAndVerifyClientCert. The server forces TLS 1.3 and
	// NextProtos ["tp/1"].
	ProxyTLS *tls.Config
	// WebTLS is used for every other handshake (h2, http/1.1, no ALPN). nil refuses them.
	WebTLS *tls.Config
	// Web serves the website (ACME, enrollment, static pages) over WebTLS on the same
	// listener, and over HTTP/3 when ServeQUIC runs. Required when WebTLS is set.
	// WebTLS.GetCertificate picks each site's certificate by SNI; offering "acme-tls/1"
	// in WebTLS.NextProtos lets it answer ACME tls-alpn-01 challenges (demux.go).
	Web http.Handler
	// WebNames, when set, says whether the website answers to a server name (SNI; ""
	// when the client sent none). A handshake for a name it refuses fails with the
	// TLS alert unrecognized_name. nil accepts every name.
	WebNames func(serverName string) bool
	// ProxyNames, when set, says whether a server name (SNI, lower case, no
	// trailing dot) is a proxy name: a handshake for one that does not offer
	// "tp/1" gets a TLS 1.3 configuration that requires and verifies the client
	// certificate as ProxyTLS does (ALPN h2 and http/1.1 on TCP, h3 on QUIC), and
	// its requests are served as an HTTPS proxy (httpproxy.go): CONNECT, reverse
	// tunnels, and ProxyHTTP for the rest. It must never accept a website's name:
	// browsers would be asked for a certificate there.
	ProxyNames func(serverName string) bool
	// DevicesOnly, when set, says whether a website name (SNI, lower case, no
	// trailing dot) is open to enrolled devices only, e.g. a name exposed with
	// tp expose --http --devices-only. A handshake for one that does not offer
	// "tp/1" gets the website's certificate and ALPN (h2, http/1.1; h3 on QUIC)
	// but TLS 1.3 and a client certificate required and verified as ProxyTLS
	// does (ClientCAs, VerifyConnection), and its requests still go to Web,
	// which sees the verified certificate in Request.TLS. It is consulted for
	// every such ClientHello, so it must answer quickly, and must never accept
	// a name a browser is meant to reach without a certificate. Needs WebTLS.
	DevicesOnly func(serverName string) bool
	// ProxyHTTP serves the requests on a proxy name that are neither CONNECT nor
	// a reverse tunnel (e.g. discovery); nil answers 404.
	ProxyHTTP http.Handler
	// Passthrough, when set, routes TCP connections for names registered for public
	// pass-through to a handler without terminating TLS (demux.go, PassthroughFunc).
	Passthrough PassthroughFunc
	// Identify maps a verified connection to an identity; an error refuses the session.
	Identify func(cs tls.ConnectionState) (authz.Identity, error)
	// Authorizer decides every dial; an error denies.
	Authorizer authz.Authorizer
	// Resolver resolves destination names once per session. Default net.DefaultResolver.
	Resolver Resolver
	// DialContext connects to an authorised destination address. Default: a
	// net.Dialer whose Control hook refuses any address the policy did not see
	// (set DialContext only in tests; it bypasses that hook).
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// SelfAddrs are this server's listeners besides those Serve runs on (which are
	// known already), e.g. a UDP port. Destinations that reach any of them are
	// refused with CodeSelfDial unless AllowSelfDial is set.
	SelfAddrs     []netip.AddrPort
	AllowSelfDial bool
	// Logger receives one line per connection. Default slog.Default().
	Logger *slog.Logger
	// TicketKeys, when set, supplies the TLS session-ticket keys (shared by the
	// instances on one database), so a ticket from one resumes on another. Nil:
	// each instance makes its own (demux.go).
	TicketKeys TicketKeySource
	// HandshakeTimeout bounds the TLS handshake (default 10s). HelloTimeout bounds
	// reading the client hello (default 10s). DialTimeout bounds name resolution, the
	// policy decision and each connection attempt (default 10s).
	HandshakeTimeout, HelloTimeout, DialTimeout time.Duration
	// MaxConns bounds concurrently handled connections (proxy and web); excess
	// connections are closed right after accept. Default 10000.
	MaxConns int
	// MaxWebConns bounds website connections (TCP after the handshake, and h3)
	// separately, so that browsers or anyone on the Internet holding web
	// connections open can never take the slots of proxy clients. Default
	// MaxConns/2.
	MaxWebConns int
	// MaxHandshakesPerIP bounds connections from one source address that have not
	// finished their TLS handshake yet, so one host cannot hold the shared slots
	// with handshakes that never complete. Default 128.
	MaxHandshakesPerIP int
	// MaxSessionsPerIdentity bounds the sessions one device identity (user@device)
	// has open at once over all its connections and both transports: proxy
	// requests, UDP flows and reverse control sessions. An agent's accept
	// connections are not counted: they carry other identities' sessions, which
	// count for those. Excess requests are refused with CodeTooManySessions.
	// Default DefaultMaxSessionsPerIdentity.
	MaxSessionsPerIdentity int
	// Reverse configures reverse listeners (reverse.go); a zero value disables them.
	Reverse ReverseOptions
	// Peers, with Reverse.Store, carries dials of reverse names that other
	// instances serve to them, and serves theirs (peer.go); nil turns peering off.
	Peers *PeerOptions
	// UDP bounds UDP flows (udp.go).
	UDP UDPOptions
	// ConnectUDP bounds CONNECT-UDP flows on the proxy names (masque_udp.go).
	ConnectUDP ConnectUDPOptions
	// IPTunnel serves CONNECT-IP on the proxy names (connectip.go); nil
	// refuses it.
	IPTunnel *IPTunnels
	// WebTransport serves browsers' sessions on the website's HTTP/3 at
	// wire.WebTransportPath (webtransport.go). Needs WebTLS.
	WebTransport bool
	// OnSessionEnd, when set, receives one record per session as it ends (proxy
	// requests, reverse operations, public sessions), beside its log line: the
	// audit trail (audit.go). It runs on the session's goroutine and must not block.
	OnSessionEnd func(SessionRecord)
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("proxy: server closed")

// Server is the public TLS listener: the proxy for ALPN "tp/1" and the website for
// everything else.
type Server struct {
	cfg      Config
	log      *slog.Logger
	tls      *tls.Config // the listener config: picks proxyTLS or webTLS per ClientHello
	proxyTLS *tls.Config
	webTLS   *tls.Config
	web      *webServer
	// demux.go: separate session-ticket keys for proxy and website, the
	// configuration that refuses unknown website names, and QUIC's per-ALPN choice.
	tickets     ticketKeys
	unknownName *tls.Config
	h3TLS       *tls.Config
	quicTLS     *tls.Config
	// httpproxy.go: the proxy names' TLS configurations (TCP and QUIC) and servers.
	connectTLS   *tls.Config
	connectH3TLS *tls.Config
	connect      *proxyHTTP
	// webtransport.go: browsers' sessions on the website's HTTP/3; nil
	// without Config.WebTransport.
	wt *wtServer
	// demux.go: the website configurations of devices-only names (TCP and
	// QUIC); nil without Config.DevicesOnly.
	devicesTLS   *tls.Config
	devicesH3TLS *tls.Config
	// carrier.go: the tls carrier's configuration ("tp-carrier/1", the device
	// certificate required), the mux under the QUIC server and the http
	// carrier's sessions (package proxy/carrier).
	carrierTLS   *tls.Config
	carriers     atomic.Pointer[carrier.Mux]
	socket       atomic.Pointer[udpgro.Reader] // the first QUIC server's socket, read under the carrier mux
	httpCarriers carrier.HTTPSessions
	// tlsmux.go: the proxy configuration for a client that offers "tp-mux/1"
	// (many sessions on one connection), which it prefers to "tp/1".
	muxTLS *tls.Config

	active     atomic.Int64           // connections counted against MaxConns
	webConns   atomic.Int64           // website connections counted against MaxWebConns
	handshakes perIPCount             // unfinished TLS handshakes per source address
	perID      identityCount          // open sessions per device identity (limits.go)
	sessions   registry               // established sessions, for Recheck
	ends       endRecords             // how recently aborted sessions ended, for op "why"
	rev        *reverseRegistry       // reverse names; nil when Config.Reverse.Zone is empty
	peers      *peer.Pool             // other instances (peer.go); nil without Config.Peers
	peerLive   peerLive               // dials forwarded to other instances, for their end notices (peer_end.go)
	peerTLS    *tls.Config            // ALPN tp-peer/1: node certificates only
	udp        udpState               // UDP flow bounds and counters (udp.go)
	cudp       masque.UDPCounters     // CONNECT-UDP counters (package proxy/masque)
	holds      connHolds              // dialers' sessions on agents' QUIC connections (quicholds.go)
	limits     atomic.Pointer[Limits] // timeouts and caps; SetLimits swaps them (livelimits.go)
	stats      counters               // for monitoring (stats.go)
	wg         sync.WaitGroup         // connection goroutines (not web conns, which http.Server owns)

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	closed    bool

	force      context.Context // cancelled when Shutdown gives up draining
	forceClose context.CancelFunc
	draining   context.Context // cancelled when Shutdown begins
	drain      context.CancelFunc
	stopped    context.Context // cancelled when Shutdown returns: the drain is over
	stop       context.CancelFunc
	onBye      atomic.Pointer[func()] // tests: op "bye" began to wait for the connection's other streams (bye.go)
}

// New validates cfg, fills defaults and returns a Server.
func New(cfg Config) (*Server, error) {
	var errs []error
	if cfg.ProxyTLS == nil {
		errs = append(errs, errors.New("ProxyTLS is required"))
	} else {
		if cfg.ProxyTLS.ClientAuth != tls.RequireAndVerifyClientCert {
			errs = append(errs, errors.New("ProxyTLS.ClientAuth must be tls.RequireAndVerifyClientCert"))
		}
		if cfg.ProxyTLS.ClientCAs == nil {
			errs = append(errs, errors.New("ProxyTLS.ClientCAs is required"))
		}
		if len(cfg.ProxyTLS.Certificates) == 0 && cfg.ProxyTLS.GetCertificate == nil && cfg.ProxyTLS.GetConfigForClient == nil {
			errs = append(errs, errors.New("ProxyTLS needs Certificates or GetCertificate"))
		}
	}
	if cfg.Peers != nil && (cfg.Reverse.Store == nil || cfg.Reverse.Zone == "" || cfg.Peers.Route == nil || cfg.Peers.ServerTLS == nil || cfg.Peers.ClientTLS == nil || cfg.Peers.Self == "") {
		errs = append(errs, errors.New("Peers needs Reverse.Zone and Reverse.Store, and its Self, Route, ServerTLS and ClientTLS"))
	}
	if cfg.WebTLS != nil && cfg.Web == nil {
		errs = append(errs, errors.New("Web handler is required when WebTLS is set"))
	}
	if cfg.Identify == nil {
		errs = append(errs, errors.New("Identify is required"))
	}
	if err := cfg.ConnectUDP.Validate(); err != nil {
		errs = append(errs, err)
	}
	if cfg.Authorizer == nil {
		errs = append(errs, errors.New("Authorizer is required"))
	}
	lim, err := limitsOf(&cfg).withDefaults()
	if err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("proxy: invalid config: %w", err)
	}

	if cfg.Resolver == nil {
		cfg.Resolver = net.DefaultResolver
	}
	// cfg.DialContext stays nil unless a test sets it: dial then uses the guarded
	// dialer, whose Control hook refuses addresses the policy did not see.
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	// Config keeps the bounds in force at start, defaults filled in, as
	// Limits() reports them until SetLimits changes them.
	cfg.HandshakeTimeout, cfg.HelloTimeout, cfg.DialTimeout = lim.HandshakeTimeout, lim.HelloTimeout, lim.DialTimeout
	cfg.MaxConns, cfg.MaxWebConns, cfg.MaxHandshakesPerIP, cfg.MaxSessionsPerIdentity = lim.MaxConns, lim.MaxWebConns, lim.MaxHandshakesPerIP, lim.MaxSessionsPerIdentity

	s := &Server{cfg: cfg, log: cfg.Logger, listeners: make(map[net.Listener]struct{})}
	s.limits.Store(&lim)
	s.force, s.forceClose = context.WithCancel(context.Background())
	s.draining, s.drain = context.WithCancel(context.Background())
	s.stopped, s.stop = context.WithCancel(context.Background())
	s.proxyTLS = cfg.ProxyTLS.Clone()
	s.proxyTLS.MinVersion = tls.VersionTLS13
	s.proxyTLS.MaxVersion = 0
	s.proxyTLS.NextProtos = []string{wire.ALPN}
	if cfg.WebTLS != nil {
		s.webTLS = cfg.WebTLS.Clone()
		if len(s.webTLS.NextProtos) == 0 {
			s.webTLS.NextProtos = []string{"h2", "http/1.1"}
		}
		s.web = newWebServer(s.carrierRoutes(cfg.Web), s.log, s.releaseWeb)
		if cfg.WebTransport {
			s.wt = newWTServer(s.web.h3)
			web := s.web.h3.Server.Handler // counts the requests in flight (h3Server)
			s.web.h3.Server.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if isWebTransport(r) {
					s.web.h3.busy.Add(1)
					defer s.web.h3.busy.Add(-1)
					s.serveWebTransport(w, r)
					return
				}
				web.ServeHTTP(w, r)
			})
		}
		if cfg.DevicesOnly != nil {
			s.devicesTLS = s.webTLS.Clone()
			s.devicesTLS.MinVersion, s.devicesTLS.MaxVersion = tls.VersionTLS13, 0 // certificate_required is TLS 1.3's alert
			s.devicesTLS.NextProtos = []string{"h2", "http/1.1"}                   // never acme-tls/1: not an ACME name
			s.devicesTLS.ClientAuth = tls.RequireAndVerifyClientCert
			s.devicesTLS.ClientCAs = s.proxyTLS.ClientCAs
			s.devicesTLS.VerifyPeerCertificate = s.proxyTLS.VerifyPeerCertificate
			s.devicesTLS.VerifyConnection = s.proxyTLS.VerifyConnection
			s.devicesH3TLS = s.devicesTLS.Clone()
			s.devicesH3TLS.NextProtos = []string{http3.NextProtoH3}
		}
	}
	if cfg.ProxyNames != nil {
		s.connectTLS = s.proxyTLS.Clone()
		s.connectTLS.NextProtos = []string{"h2", "http/1.1"}
		s.connectH3TLS = s.proxyTLS.Clone()
		s.connectH3TLS.NextProtos = []string{http3.NextProtoH3}
		s.connect = newProxyHTTP(s)
	}
	s.carrierTLS = s.proxyTLS.Clone()
	s.carrierTLS.NextProtos = []string{wire.ALPNCarrier}
	s.muxTLS = s.proxyTLS.Clone()
	s.muxTLS.NextProtos = []string{wire.ALPNMux, wire.ALPN}
	s.tls = &tls.Config{GetConfigForClient: s.configForClient}
	s.initDemux()
	if cfg.Reverse.Zone != "" {
		s.rev = newReverseRegistry(cfg.Reverse, reverse.Hooks{Log: s.log, Track: s.track, Untrack: s.untrack,
			Serve: s.acceptPublic, Leases: &s.stats.leases}) // public ports: reverse_public.go
		if s.peers = peer.NewPool(cfg.Peers); s.peers != nil {
			s.peerTLS = s.peers.ServerTLS()
		}
	}
	return s, nil
}

// Serve accepts connections on ln until ctx ends or Shutdown is called. The caller
// owns ln; Serve closes it when it returns. Cancelling ctx ends every connection
// Serve accepted; Shutdown instead lets them drain.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if !s.track(ln) {
		_ = ln.Close()
		return ErrServerClosed
	}
	defer s.untrack(ln)
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	if s.web != nil {
		s.web.start()
	}

	var backoff time.Duration
	for {
		raw, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: back off instead of spinning.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed; retrying", "err", err, "backoff", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		backoff = 0
		ip := remoteIP(raw)
		if !s.handshakes.acquire(ip, s.lim().MaxHandshakesPerIP) {
			s.stats.handshakeFailed("per_ip_cap")
			_ = raw.Close()
			s.log.Warn("connection refused: too many unfinished handshakes from one address", "remote", raw.RemoteAddr().String(), "max_handshakes_per_ip", s.lim().MaxHandshakesPerIP)
			continue
		}
		if s.active.Add(1) > int64(s.lim().MaxConns) {
			s.handshakes.release(ip)
			s.active.Add(-1)
			s.stats.handshakeFailed("max_conns")
			_ = raw.Close()
			s.log.Warn("connection refused: too many connections", "remote", raw.RemoteAddr().String(), "max_conns", s.lim().MaxConns)
			continue
		}
		// Add under the lock that Shutdown takes to set closed, so no Add can race
		// with Shutdown's Wait.
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			s.release()
			s.handshakes.release(ip)
			_ = raw.Close()
			return ErrServerClosed
		}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.handle(ctx, raw, func() { s.handshakes.release(ip) })
		}()
	}
}

// StopAccepting is Shutdown's first step, which a caller may take before it:
// from its return, new TCP connections are refused by the operating system and
// new QUIC connections with CONNECTION_REFUSED. Sessions are left alone.
func (s *Server) StopAccepting() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.drain() // requests still waiting for their hello end now: no session to drain
	for ln := range s.listeners {
		_ = ln.Close()
	}
}

// Shutdown stops accepting, waits for proxy sessions and web requests to finish, and
// when ctx ends closes whatever is left. It is safe to call more than once and
// concurrently; it returns ctx.Err() if it had to force connections closed.
func (s *Server) Shutdown(ctx context.Context) error {
	s.StopAccepting()
	// Agents' control sessions would otherwise hold the drain for its whole
	// length: they are told to reconnect, while their data sessions drain.
	if s.rev != nil {
		s.rev.EndAgents(wire.ErrShutdown)
	}
	if s.peers != nil {
		s.peers.Close()
	}

	var webErr error
	webDone := make(chan struct{})
	go func() {
		defer close(webDone)
		if s.web != nil {
			webErr = s.web.shutdown(ctx)
		}
		if s.connect != nil {
			if err := s.connect.shutdown(ctx); webErr == nil {
				webErr = err
			}
		}
	}()
	drained := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(drained)
	}()
	var err error
	select {
	case <-drained:
	case <-ctx.Done():
		err = ctx.Err()
		s.forceClose()
		<-drained
	}
	<-webDone
	s.stop() // ServeQUIC stops refusing and closes its socket (quic.go)
	if err == nil && webErr != nil {
		err = webErr
	}
	return err
}

func (s *Server) track(ln net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.listeners[ln] = struct{}{}
	return true
}

func (s *Server) untrack(ln net.Listener) {
	s.mu.Lock()
	delete(s.listeners, ln)
	s.mu.Unlock()
	_ = ln.Close()
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// release gives back one MaxConns slot.
func (s *Server) release() { s.active.Add(-1) }

// toWeb moves a handshaken website connection from the shared budget to the
// website's own; false (and no slot held) when the website's budget is spent.
func (s *Server) toWeb(remote string) bool {
	s.release()
	if s.webConns.Add(1) > int64(s.lim().MaxWebConns) {
		s.webConns.Add(-1)
		s.log.Warn("website connection refused: too many website connections", "remote", remote, "max_web_conns", s.lim().MaxWebConns)
		return false
	}
	return true
}

// releaseWeb gives back one MaxWebConns slot.
func (s *Server) releaseWeb() { s.webConns.Add(-1) }

// perIPCount counts something per source address, with a bound.
type perIPCount struct {
	mu sync.Mutex
	n  map[netip.Addr]int
}

func (c *perIPCount) acquire(ip netip.Addr, max int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[netip.Addr]int{}
	}
	if c.n[ip] >= max {
		return false
	}
	c.n[ip]++
	return true
}

func (c *perIPCount) release(ip netip.Addr) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[ip] <= 1 {
		delete(c.n, ip)
		return
	}
	c.n[ip]--
}

// remoteIP is the connection's source address without port (the zero Addr when
// it has none, which then shares one bound).
func remoteIP(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}
