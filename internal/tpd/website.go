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
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/internal/config"
	"github.com/tp-proxy/tp/internal/website"
	"github.com/tp-proxy/tp/proxy"
)

// webState is the website half of the daemon: the sites, their certificates and
// the optional plain-HTTP listener.
type webState struct {
	handler *website.Handler
	certs   atomic.Pointer[website.Certs] // set by startWeb once the public port is known
	public  atomic.Pointer[string]        // the public TCP listener's address
	http    atomic.Pointer[string]        // the plain-HTTP listener's address
}

// ownPrefixes are the paths of tpd's own endpoints: they stay on tpd's names even
// when a site has the same name.
var ownPrefixes = []string{"/acme/", "/tp/"}

// newWebsite builds the handler that serves the sites and, on tpd's own names, own.
func (d *Daemon) newWebsite(own http.Handler) error {
	var sites []website.Site
	for _, s := range d.cfg.Sites {
		site := website.Site{Name: s.Name, Root: s.Root}
		if s.Upstream != "" {
			u, err := url.Parse(s.Upstream)
			if err != nil {
				return fmt.Errorf("site %s: upstream: %w", s.Name, err)
			}
			site.Upstream = u
		}
		sites = append(sites, site)
	}
	h, err := website.New(website.Options{
		Sites: sites, Default: d.cfg.DefaultSite,
		OwnNames: d.cfg.Names, Own: own, OwnPrefixes: ownPrefixes,
		MaxBody: d.cfg.SiteMaxBody, UpstreamTimeout: d.cfg.SiteUpstreamTimeout,
		Logger: d.log,
	})
	if err != nil {
		return fmt.Errorf("sites: %w", err)
	}
	d.web.handler = h
	return nil
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
	switch {
	case acmeOnly || d.web.handler.IsSite(name):
		if certs == nil {
			return nil, fmt.Errorf("no certificate for site %q yet: tpd is starting", name)
		}
		return certs.GetCertificate(hello)
	case name == "" || d.web.handler.IsOwn(name):
		return d.cert.Load(), nil
	case d.cfg.DefaultSite != "" && certs != nil: // an unknown name: the default site
		h := *hello
		h.ServerName = d.cfg.DefaultSite
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
	case d.web.handler.IsOwn(host):
	case d.web.handler.IsOwn("localhost") && isLoopbackOrAny(public):
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
	if names := d.cfg.SiteNames(); len(names) > 0 {
		dir, roots, err := d.siteDirectory(public.Addr())
		if err != nil {
			if httpLn != nil {
				httpLn.Close()
			}
			return err
		}
		tcp, _ := public.Addr().(*net.TCPAddr)
		o := website.CertOptions{
			Names: names, Storage: d.cfg.SitesDir(), CA: dir, Email: d.cfg.ACMEEmail, TrustedRoots: roots,
			TLSALPNPort: tcp.Port, Logger: d.log,
		}
		if !tcp.IP.IsUnspecified() {
			o.ListenHost = tcp.IP.String()
		}
		if httpLn != nil {
			o.HTTPPort = httpLn.Addr().(*net.TCPAddr).Port
		}
		if d.cfg.ACMECA == "" {
			o.EAB = d.ca.NewSiteEAB
		}
		certs, err := website.NewCerts(o)
		if err == nil {
			err = certs.Manage(ctx)
		}
		if err != nil {
			if httpLn != nil {
				httpLn.Close()
			}
			return err
		}
		d.web.certs.Store(certs)
		d.log.Info("managing site certificates", "sites", strings.Join(names, ","), "acme", dir)
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
	if certs := d.web.certs.Load(); certs != nil {
		g.Go(func() error { <-ctx.Done(); certs.Stop(); return nil })
	}
	return nil
}

// serveHTTP is the plain-HTTP listener: ACME http-01 answers, and a permanent
// redirect to HTTPS for every name the website knows.
func (d *Daemon) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if certs := d.web.certs.Load(); certs != nil && certs.HTTPChallenge(w, r) {
		return
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(r.Host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if host == "" || !d.web.handler.KnowsName(host) {
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

// passthroughGuard wraps a lookup of names registered for public pass-through
// (proxy.Config.Passthrough) so that it can never claim tpd's own names or a
// site's: those must keep reaching tpd. Wire it as
// proxy.Config{Passthrough: d.passthroughGuard(lookup)} in New.
func (d *Daemon) passthroughGuard(lookup proxy.PassthroughFunc) proxy.PassthroughFunc {
	return func(name string) (func(context.Context, net.Conn), bool) {
		if d.web.handler.IsOwn(name) || d.web.handler.IsSite(name) {
			return nil, false
		}
		return lookup(name)
	}
}
