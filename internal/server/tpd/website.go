package tpd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/website"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// webState is the website half of the daemon: the sites, their certificates and
// the optional plain-HTTP listener. A reload replaces the handler and the
// certificates whole (reloadSites); readers load them once per use.
type webState struct {
	handler atomic.Pointer[website.Handler]
	own     http.Handler                  // tpd's own endpoints, kept for the handlers reloads build
	certs   atomic.Pointer[website.Certs] // set by startWeb once the public port is known
	pending atomic.Pointer[website.Certs] // a reload's certificates before the swap: they answer challenges
	exposed atomic.Pointer[website.Certs] // on demand for names held by reverse HTTP tunnels (revhttp.go)
	env     atomic.Pointer[certEnv]       // set by startWeb: what new certificates need
	public  atomic.Pointer[string]        // the public TCP listener's address
	http    atomic.Pointer[string]        // the plain-HTTP listener's address
}

// certEnv is what startWeb learned that certificates for a reloaded site list
// need: the daemon's context, the public listener and the plain-HTTP port.
type certEnv struct {
	ctx      context.Context
	public   net.Addr
	httpPort int
}

// site is the website handler in use now.
func (d *Daemon) site() *website.Handler { return d.web.handler.Load() }

// serveWeb is the proxy's web handler: it follows reloads.
func (d *Daemon) serveWeb(w http.ResponseWriter, r *http.Request) { d.site().ServeHTTP(w, r) }

// ownPrefixes are the paths of tpd's own endpoints: they stay on tpd's names even
// when a site has the same name.
var ownPrefixes = []string{"/acme/", "/tp/", wire.DiscoveryPath}

// newWebsite builds the handler that serves the sites and, on tpd's own names, own.
func (d *Daemon) newWebsite(own http.Handler) error {
	d.web.own = own
	h, err := d.buildWebsite(d.cfg)
	if err != nil {
		return err
	}
	d.web.handler.Store(h)
	return nil
}

// buildWebsite builds the handler for cfg's sites; a reload builds one before
// it swaps.
func (d *Daemon) buildWebsite(cfg config.Server) (*website.Handler, error) {
	var sites []website.Site
	for _, s := range cfg.Sites {
		site := website.Site{Name: s.Name, Root: s.Root}
		if s.Upstream != "" {
			u, err := url.Parse(s.Upstream)
			if err != nil {
				return nil, fmt.Errorf("site %s: upstream: %w", s.Name, err)
			}
			site.Upstream = u
		}
		sites = append(sites, site)
	}
	h, err := website.New(website.Options{
		Sites: sites, Default: cfg.DefaultSite,
		OwnNames: d.cfg.Names, Own: d.web.own, OwnPrefixes: ownPrefixes,
		MaxBody: cfg.SiteMaxBody, UpstreamTimeout: cfg.SiteUpstreamTimeout,
		Logger:  d.log,
		Reverse: d.reverseUpstream, ReverseZone: d.cfg.ReverseZone, Device: d.deviceRequest, // revhttp.go
	})
	if err != nil {
		return nil, fmt.Errorf("sites: %w", err)
	}
	return h, nil
}

// webTLS is the website's TLS configuration: each site's ACME certificate by SNI,
// tpd's own certificate on its own names (and without SNI), tls-alpn-01 answers.
func (d *Daemon) webTLS() *tls.Config {
	return &tls.Config{
		NextProtos:     []string{"h2", "http/1.1", proxy.ALPNACME},
		GetCertificate: d.siteCertificate,
	}
}

func (d *Daemon) siteCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	name := strings.TrimSuffix(strings.ToLower(hello.ServerName), ".")
	certs := d.web.certs.Load()
	acmeOnly := len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == proxy.ALPNACME
	if p := d.web.pending.Load(); acmeOnly && p != nil { // a reload's new names are being validated
		certs = p
	}
	site := d.site()
	switch {
	case site.IsReverse(name): // a name held by a reverse HTTP tunnel now (revhttp.go)
		exposed := d.web.exposed.Load()
		if exposed == nil {
			return nil, fmt.Errorf("no certificate for %q yet: tpd is starting", name)
		}
		return exposed.GetCertificate(hello)
	case acmeOnly || site.IsSite(name):
		if certs == nil {
			return nil, fmt.Errorf("no certificate for site %q yet: tpd is starting", name)
		}
		return certs.GetCertificate(hello)
	case name == "" || site.IsOwn(name):
		return d.cert.Load(), nil
	case site.Default() != "" && certs != nil: // an unknown name: the default site
		h := *hello
		h.ServerName = site.Default()
		return certs.GetCertificate(&h)
	}
	return nil, fmt.Errorf("no site is configured for %q", name)
}

// siteDirectory is the ACME directory site certificates come from: acme-ca, or
// the embedded CA's sites provisioner on the public port. tpd reaches itself by
// the listener's address when that is one of its names (the default), else by
// localhost or its first name.
func (d *Daemon) siteDirectory(public net.Addr) (dir string, roots *x509.CertPool, err error) {
	if d.cfg.ACMECA != "" {
		if d.cfg.ACMECARoot == "" {
			return d.cfg.ACMECA, nil, nil
		}
		pem, err := os.ReadFile(d.cfg.ACMECARoot)
		if err != nil {
			return "", nil, fmt.Errorf("acme-ca-root: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return "", nil, fmt.Errorf("acme-ca-root %s holds no PEM certificate", d.cfg.ACMECARoot)
		}
		return d.cfg.ACMECA, roots, nil
	}
	roots = x509.NewCertPool()
	roots.AddCert(d.pki.Root)
	host, port, err := net.SplitHostPort(selfAddr(public))
	if err != nil {
		return "", nil, err
	}
	switch {
	case d.site().IsOwn(host):
	case d.site().IsOwn("localhost") && isLoopbackOrAny(public):
		host = "localhost"
	default:
		host = d.cfg.Names[0]
	}
	return "https://" + net.JoinHostPort(host, port) + acme.SitesDirectoryPath(), roots, nil
}

// selfAddr is an address that reaches a listener on addr from this host.
func selfAddr(addr net.Addr) string {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return addr.String()
	}
	ip := tcp.IP
	if ip == nil || ip.IsUnspecified() {
		ip = net.IPv4(127, 0, 0, 1)
		if tcp.IP != nil && tcp.IP.To4() == nil {
			ip = net.IPv6loopback
		}
	}
	return net.JoinHostPort(ip.String(), strconv.Itoa(tcp.Port))
}

func isLoopbackOrAny(addr net.Addr) bool {
	tcp, ok := addr.(*net.TCPAddr)
	return ok && (tcp.IP == nil || tcp.IP.IsUnspecified() || tcp.IP.IsLoopback())
}

// startWeb runs what the sites need once the public port is open: the plain-HTTP
// listener (http-listen) and certificate management. Both stop when ctx ends.
func (d *Daemon) startWeb(ctx context.Context, g *errgroup.Group, public net.Listener) error {
	addr := selfAddr(public.Addr())
	d.web.public.Store(&addr)
	var httpLn net.Listener
	if d.cfg.HTTPListen != "" {
		var err error
		if httpLn, err = listenHTTP(d.cfg.HTTPListen); err != nil {
			return err
		}
		a := selfAddr(httpLn.Addr())
		d.web.http.Store(&a)
	}
	env := &certEnv{ctx: ctx, public: public.Addr()}
	if httpLn != nil {
		env.httpPort = httpLn.Addr().(*net.TCPAddr).Port
	}
	d.web.env.Store(env)
	if names := d.cfg.SiteNames(); len(names) > 0 {
		certs, err := d.manageCerts(env, names)
		if err != nil {
			if httpLn != nil {
				httpLn.Close()
			}
			return err
		}
		d.web.certs.Store(certs)
	}
	if d.cfg.ReverseZone != "" {
		exposed, err := d.manageExposedCerts(env)
		if err != nil {
			if httpLn != nil {
				httpLn.Close()
			}
			return err
		}
		d.web.exposed.Store(exposed)
	}
	if httpLn != nil {
		srv := &http.Server{
			Handler:           http.HandlerFunc(d.serveHTTP),
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       time.Minute,
			MaxHeaderBytes:    16 << 10,
		}
		d.log.Info("serving plain HTTP (redirects to HTTPS, ACME http-01)", "addr", httpLn.Addr().String())
		g.Go(func() error {
			if err := srv.Serve(httpLn); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("http-listen %s: %w", d.cfg.HTTPListen, err)
			}
			return nil
		})
		g.Go(func() error {
			<-ctx.Done()
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
			return nil
		})
	}
	g.Go(func() error {
		<-ctx.Done()
		d.ops.reload.mu.Lock() // a reload swaps certificates under this lock
		defer d.ops.reload.mu.Unlock()
		// Certificate operations under way end with ctx; their locks are
		// released before tpd returns.
		if certs := d.web.certs.Load(); certs != nil {
			certs.StopAndWait(10 * time.Second)
		}
		if exposed := d.web.exposed.Load(); exposed != nil {
			exposed.StopAndWait(10 * time.Second)
		}
		return nil
	})
	return nil
}

// manageCerts starts keeping certificates for names: loaded from the sites
// directory, obtained or renewed in the background until env.ctx ends or Stop.
func (d *Daemon) manageCerts(env *certEnv, names []string) (*website.Certs, error) {
	dir, roots, err := d.siteDirectory(env.public)
	if err != nil {
		return nil, err
	}
	tcp, _ := env.public.(*net.TCPAddr)
	o := website.CertOptions{
		Names: names, Storage: d.cfg.SitesDir(), Shared: d.siteStorage(dir), CA: dir, Email: d.cfg.ACMEEmail, TrustedRoots: roots,
		TLSALPNPort: tcp.Port, HTTPPort: env.httpPort, Logger: d.log,
	}
	if !tcp.IP.IsUnspecified() {
		o.ListenHost = tcp.IP.String()
	}
	if d.cfg.ACMECA == "" {
		o.EAB = d.ca.NewSiteEAB
	}
	certs, err := website.NewCerts(o)
	if err != nil {
		return nil, err
	}
	if err := certs.Manage(env.ctx); err != nil {
		certs.Stop()
		return nil, err
	}
	d.log.Info("managing site certificates", "sites", strings.Join(names, ","), "acme", dir)
	return certs, nil
}

// serveHTTP is the plain-HTTP listener: ACME http-01 answers, and a permanent
// redirect to HTTPS for every name the website knows.
func (d *Daemon) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == wire.CarrierHTTPPath && d.proxy != nil {
		// The http carrier on plain HTTP, for plain forwarding proxies
		// (docs/PROTOCOL.md §9.8): QUIC inside carries its own security.
		d.proxy.CarrierHTTPHandler().ServeHTTP(w, r)
		return
	}
	for _, c := range []*website.Certs{d.web.pending.Load(), d.web.certs.Load(), d.web.exposed.Load()} {
		if c != nil && c.HTTPChallenge(w, r) {
			return
		}
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(r.Host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if host == "" || !d.site().KnowsName(host) {
		http.Error(w, "404 not found: no site is configured for this name", http.StatusNotFound)
		return
	}
	target := url.URL{Scheme: "https", Host: host, Path: r.URL.Path, RawQuery: r.URL.RawQuery}
	if pu, err := url.Parse(d.cfg.PublicURL()); err == nil && pu.Port() != "" {
		target.Host = net.JoinHostPort(host, pu.Port())
	}
	http.Redirect(w, r, target.String(), http.StatusPermanentRedirect)
}

func listenHTTP(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	switch {
	case err == nil:
		return ln, nil
	case errors.Is(err, syscall.EACCES):
		return nil, fmt.Errorf("cannot listen on http-listen %s: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE, or set http-listen to another port or to \"\"", addr)
	case errors.Is(err, syscall.EADDRINUSE):
		return nil, fmt.Errorf("cannot listen on http-listen %s: something else is already listening there; stop it, or set http-listen to another port or to \"\"", addr)
	default:
		return nil, fmt.Errorf("cannot listen on http-listen %s: %w", addr, err)
	}
}

// siteValidator validates the embedded CA's site challenges against tpd itself:
// tls-alpn-01 through the public port's demux, http-01 through the plain-HTTP
// listener. Nothing leaves the host.
type siteValidator struct{ d *Daemon }

var _ acme.SiteValidator = siteValidator{}

func (v siteValidator) TLSDial(network, _ string, cfg *tls.Config) (*tls.Conn, error) {
	addr := v.d.web.public.Load()
	if addr == nil {
		return nil, errors.New("tpd is not serving yet")
	}
	dialer := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: cfg}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := dialer.DialContext(ctx, network, *addr)
	if err != nil {
		return nil, err
	}
	return c.(*tls.Conn), nil
}

func (v siteValidator) Get(rawURL string) (*http.Response, error) {
	addr := v.d.web.http.Load()
	if addr == nil {
		return nil, errors.New("http-01 needs tpd's plain-HTTP listener; set http-listen, or use tls-alpn-01")
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequest(http.MethodGet, "http://"+*addr+u.RequestURI(), nil)
	if err != nil {
		return nil, err
	}
	req.Host = u.Host
	client := &http.Client{
		Timeout:       10 * time.Second,
		Transport:     &http.Transport{Proxy: nil, DisableKeepAlives: true},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return client.Do(req)
}

// sitesForCA are the names the embedded CA may certify for the websites: none
// when a public ACME CA issues them.
func sitesForCA(cfg config.Server) []string {
	if cfg.ACMECA != "" {
		return nil
	}
	return cfg.SiteNames()
}

// siteChange is a reload's new website, built and with its certificates
// managed, but not yet in use: apply swaps it in, undo discards it.
type siteChange struct {
	d       *Daemon
	handler *website.Handler // nil: the sites did not change
	certs   *website.Certs   // nil: no site
	old     []string         // the CA's site names before
	caSet   bool             // the CA was given next's names
}

// prepareSites builds what cur → next needs for the websites: a handler for
// next's sites (a site that cannot be served fails here) and, for next's
// names, certificates (stored ones load at once, the others are obtained in
// the background). The embedded CA certifies next's names from here on; undo
// gives it back cur's.
func (d *Daemon) prepareSites(cur, next config.Server) (*siteChange, error) {
	ch := &siteChange{d: d}
	if slices.EqualFunc(cur.Sites, next.Sites, func(a, b config.Site) bool { return a == b }) &&
		cur.DefaultSite == next.DefaultSite && cur.SiteMaxBody == next.SiteMaxBody &&
		cur.SiteUpstreamTimeout == next.SiteUpstreamTimeout {
		return ch, nil
	}
	for _, n := range next.SiteNames() {
		if _, exposed := d.proxy.PublicSNI(n); exposed && !slices.Contains(cur.SiteNames(), n) {
			return nil, fmt.Errorf("site %s: an agent exposes that name publicly right now (tp expose --public-sni); a site would take it from the agent; stop that exposure first, or choose another name", n)
		}
	}
	h, err := d.buildWebsite(next)
	if err != nil {
		return nil, err
	}
	ch.handler = h
	if slices.Equal(cur.SiteNames(), next.SiteNames()) {
		ch.certs = d.web.certs.Load() // same names: the same certificates
		return ch, nil
	}
	env := d.web.env.Load()
	if env == nil {
		return nil, errors.New("the sites changed before tpd was serving; restart tpd")
	}
	if env.ctx.Err() != nil {
		return nil, errors.New("tpd is stopping")
	}
	ch.old = sitesForCA(cur)
	if d.cfg.ACMECA == "" {
		if err := d.ca.SetSiteNames(next.SiteNames()); err != nil {
			return nil, fmt.Errorf("sites: %w; restart tpd to add sites", err)
		}
		ch.caSet = true
	}
	if names := next.SiteNames(); len(names) > 0 {
		if ch.certs, err = d.manageCerts(env, names); err != nil {
			ch.undo()
			return nil, fmt.Errorf("site certificates: %w", err)
		}
		// Until apply, the new certificates answer tls-alpn-01 and http-01:
		// they obtain in the background, maybe before the swap.
		d.web.pending.Store(ch.certs)
	}
	return ch, nil
}

// undo discards a prepared change: its certificates stop and the CA certifies
// the old names again.
func (ch *siteChange) undo() {
	if ch.handler == nil {
		return
	}
	ch.d.web.pending.Store(nil)
	if c := ch.certs; c != nil && c != ch.d.web.certs.Load() {
		c.Stop()
	}
	if ch.caSet {
		_ = ch.d.ca.SetSiteNames(ch.old)
	}
}

// apply swaps the new website in: new handshakes and requests see it, and the
// old certificates stop renewing. Requests in flight finish on the old
// handler; live tunnels are not touched.
func (ch *siteChange) apply() {
	if ch.handler == nil {
		return
	}
	d := ch.d
	d.web.handler.Store(ch.handler)
	if old := d.web.certs.Swap(ch.certs); old != nil && old != ch.certs {
		old.Stop()
	}
	d.web.pending.Store(nil)
}

// sitesValidator turns on the embedded CA's websites' provisioner, which a
// reload can then give new names (SetSiteNames): on unless a public ACME CA
// issues the sites' certificates.
func sitesValidator(cfg config.Server, d *Daemon) acme.SiteValidator {
	if cfg.ACMECA != "" {
		return nil
	}
	return siteValidator{d}
}

// passthroughGuard wraps a lookup of names registered for public pass-through
// (proxy.Config.Passthrough) so that it can never claim tpd's own names or a
// site's: those must keep reaching tpd. Wire it as
// proxy.Config{Passthrough: d.passthroughGuard(lookup)} in New.
func (d *Daemon) passthroughGuard(lookup proxy.PassthroughFunc) proxy.PassthroughFunc {
	return func(name string) (func(context.Context, net.Conn), bool) {
		if site := d.site(); site.IsOwn(name) || site.IsSite(name) {
			return nil, false
		}
		return lookup(name)
	}
}
