// Package tpd assembles the TP server from its parts: the PKI and embedded CA,
// the user store, the policy engine, the authorizer, the public listener and the
// admin socket. cmd/tpd parses configuration and calls it; tests run it in-process.
package tpd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	tpweb "github.com/tp-proxy/tp/clients/web"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/lib/version"
	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/policy"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Version is reported by the binaries and in tp's "Connecting …" line.
const Version = version.Version

// serverCertLifetime is the lifetime of tpd's own TLS certificate; it is renewed
// in the background at two thirds of it.
const serverCertLifetime = 7 * 24 * time.Hour

// InitResult says what Init found or created.
type InitResult struct {
	Created     bool // the data dir was bootstrapped just now
	Fingerprint string
}

// Init creates whatever is missing in the data dir: the CA (root, intermediate,
// attestation root), tpd.yaml and the default policy. Existing files are kept.
func Init(cfg config.Server) (InitResult, error) {
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return InitResult{}, fmt.Errorf("create data dir: %w", err)
	}
	_, statErr := os.Stat(cfg.CADir())
	created := errors.Is(statErr, os.ErrNotExist)
	pki, err := acme.Bootstrap(cfg.CADir(), cfg.Names[0])
	if err != nil {
		return InitResult{}, err
	}
	if _, err := os.Stat(cfg.ConfigFile()); errors.Is(err, os.ErrNotExist) {
		if err := os.WriteFile(cfg.ConfigFile(), config.ServerYAML(cfg), 0o600); err != nil {
			return InitResult{}, fmt.Errorf("write %s: %w", cfg.ConfigFile(), err)
		}
	}
	if err := policy.WriteDefault(cfg.PolicyDir()); err != nil {
		return InitResult{}, err
	}
	return InitResult{Created: created, Fingerprint: pki.Fingerprint()}, nil
}

// Daemon is a configured tpd, ready to serve.
type Daemon struct {
	// holdsMu guards the reverse holds file; holdsClosed: Close ran, no more saves.
	holdsMu     sync.Mutex
	holdsClosed bool
	// Ready, when set, is called once Serve has opened every listener (public
	// port, QUIC, admin socket): `tpd serve` prints its banner then, so a script
	// that waits for it can run `tpd enroll` at once.
	Ready func()

	cfg    config.Server
	log    *slog.Logger
	pki    *acme.PKI
	ca     *acme.CA
	users  users.Store
	db     *pgstore.DB          // nil unless database: is set (store.go)
	certDB *pgstore.CertStorage // site certificates in db; nil without it
	policy *policy.Engine
	authz  *policy.Authorizer
	proxy  *proxy.Server
	cert   atomic.Pointer[tls.Certificate]
	// Peering (peer.go): this instance's name on the database, its node
	// certificate, and who serves which name elsewhere.
	instance string
	nodeCert atomic.Pointer[tls.Certificate]
	routes   *pgstore.Routes
	peerAddr atomic.Pointer[string] // where the other instances reach this one (runPeers)
	Created  bool                   // the data dir was bootstrapped by New

	decisions *policy.DecisionLog
	denyMu    sync.Mutex    // serialises deny-list changes and their saving; guards deny
	deny      denyMeta      // when entries were added, which device a serial belongs to
	denySave  denySaver     // writes one deny-list change (store.go)
	denyGen   atomic.Uint64 // counts deny-list reloads from the database
	checked   authState     // what live sessions were last re-checked against; maintain's
	// recheckMu serialises maintain's re-checks with a revocation's change and
	// re-check, so that the revocation's re-check is the one that closes (and
	// counts) the sessions it ends; held before denyMu.
	recheckMu sync.Mutex
	// shareEnds counts the guest shares past their end, as of the user
	// store's generation shareGen, until nextShareEnd (under recheckMu):
	// a share's end re-checks live sessions, so that a guest's end with
	// it does not wait for its certificate's.
	shareEnds    int
	shareGen     uint64
	nextShareEnd time.Time
	web          webState      // website.go
	kick         chan struct{} // asks maintain to re-check now

	limiter *sourceLimiter // the CA's and enrollment's per-source rate limit (ratelimit.go)

	audit   *AuditLog  // audit.go; nil when audit-log is off
	denials denialRing // recent policy denials, for tpd status
	started time.Time

	metrics   *metrics               // nil when admin-listen is empty (metrics.go)
	adminAddr atomic.Pointer[string] // where admin-listen listens, once open
	ops       opsState               // drain and reload (drain.go, reload.go)

	discovery     http.Handler               // the transport discovery document (discovery.go)
	revHTTP       atomic.Pointer[revHTTPRef] // names exposed over reverse HTTP tunnels (revhttp.go)
	exposedIssue  issueBucket                // bounds orders of their certificates (revhttp.go)
	exposedOrders atomic.Int64               // certificate orders begun for them
}

// New bootstraps the data dir if needed and opens every part. Close releases them.
func New(ctx context.Context, cfg config.Server, log *slog.Logger, opts ...Option) (*Daemon, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ir, err := Init(cfg)
	if err != nil {
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: log, Created: ir.Created, started: time.Now().UTC()}
	if d.pki, err = acme.LoadPKI(cfg.CADir()); err != nil {
		return nil, err
	}
	if cfg.AdminListen != "" {
		d.metrics = newMetrics(d)
	}
	if err := d.renewServerCert(); err != nil {
		return nil, err
	}
	denyList, err := d.openStores(ctx) // store.go: data dir or PostgreSQL
	if err != nil {
		return nil, err
	}
	if d.policy, err = policy.Load(ctx, cfg.PolicyDir(), policy.WithTimeout(cfg.PolicyTimeout)); err != nil {
		d.closeDB()
		return nil, fmt.Errorf("policy in %s: %w", cfg.PolicyDir(), err)
	}
	if cached, why := d.policy.Cached(); !cached {
		log.Info("policy decisions are not cached: every request evaluates the policy", "why", why)
	}
	if d.decisions, err = policy.OpenDecisionLog(cfg.DecisionLog); err != nil {
		d.closeDB()
		return nil, err
	}
	if d.audit, err = OpenAuditLog(cfg.AuditLog); err != nil {
		d.decisions.Close()
		d.closeDB()
		return nil, err
	}
	d.authz = &policy.Authorizer{Directory: d.users, Evaluator: d.policy, DenyList: denyList, Logger: log, Decisions: d.decisions}
	d.checked = authState{revision: d.policy.Revision(), users: d.users.Generation()}
	d.kick = make(chan struct{}, 1)
	if d.ca, err = d.openCA(ctx, acme.CAOptions{DBPath: acme.DBPath(cfg.DataDir), CertLifetime: cfg.CertLifetime, DNSNames: cfg.Names, ReverseZone: cfg.ReverseZone,
		SiteNames: sitesForCA(cfg), SiteValidator: sitesValidator(cfg, d), SiteHeld: d.heldName, MaxNonces: cfg.CAMaxNonces}); err != nil {
		d.decisions.Close()
		d.audit.Close()
		d.closeDB()
		return nil, err
	}
	enroller := &acme.Enroller{PKI: d.pki, CA: d.ca, Users: d.users, Logger: log,
		ReverseOwner: func(host string) (string, bool) { return d.proxy.ReverseOwner(host) },
		Denied: func(dev users.Device) (string, bool) {
			id := authz.Identity{DeviceID: dev.ID, User: dev.User, Device: dev.Name}
			if reason, denied := d.authz.DenyList.Denies(id); denied {
				return reason, true
			}
			by := dev.GrantedBy
			if share, ok := strings.CutPrefix(by, users.ShareApprover); ok {
				// A guest's device ends with its share's approver.
				id.Guest, by = dev.Scope.Guest(), ""
				if sh, err := d.users.Share(share); err == nil {
					by = sh.ApproverID()
				}
			}
			return d.authz.DenyList.DeniesApprover(id, by) // a grant is revoked with its approver
		},
		CheckCertificate: func(leaf *x509.Certificate) error {
			_, err := d.verifyClient(leaf, nil)
			return err
		},
		AllowBinding: newKeyedLimiter[string](bindingRate, bindingBurst, maxRateDevices).allow,
		Enrolled:     d.deviceEnrolled, // audit.go
		MayExpose:    d.mayExpose,      // grant.go
		GrantRevoked: d.grantRevoked,   // audit.go
		MayShare:     d.mayShare,       // grant.go
		Shared:       d.shared,         // audit.go
		ShareRevoked: d.shareRevoked,   // audit.go
		URL:          cfg.PublicURL(),
		ReverseZone:  cfg.ReverseZone,
	}
	d.ca.SetDeviceEnds(d.deviceEnds) // a guest's certificates end with its share
	if cfg.SSOIssuer != "" {         // dlogin --sso: sign-in with the organisation's provider
		enroller.SSO = &acme.SSO{Issuer: cfg.SSOIssuer, ClientID: cfg.SSOClientID, Domain: cfg.SSODomain,
			UserClaim: cfg.SSOUserClaim, GroupsClaim: cfg.SSOGroupsClaim, Scopes: cfg.SSO.Scopes(),
			RenewWithSignIn: cfg.SSORenew == config.SSORenewSignIn, KeepRefresh: cfg.SSOKeepRefresh,
			GroupsRequired: cfg.SSOGroupsRequired, MaxDevices: cfg.SSOMaxDevices, GuestDomains: cfg.SSO.GuestDomains()}
		if d.db != nil { // an ID token enrols one device, whichever instance it is shown to
			enroller.SSO.Used = pgstore.NewSSOUsed(d.db)
		}
	}
	// Anyone reaches these without a certificate: each source address gets a
	// token bucket, shared by both.
	d.limiter = newSourceLimiter(cfg.CARateLimit, cfg.CARateBurst)
	web := http.NewServeMux()
	web.Handle("/acme/", limitSources(d.limiter, d.metrics.countIssued(d.ca.Handler())))
	web.Handle("/tp/", limitSources(d.limiter, enroller.Handler()))
	// Transport discovery (discovery.go): cheap, static, no disk or CA behind it.
	// The same handler answers on the proxy names (ProxyHTTP).
	d.discovery = discoveryHandler{discoveryFor(cfg, cfg.ProxyNames)}
	web.Handle(wire.DiscoveryPath, d.discovery)
	web.HandleFunc("GET "+login.PathGrantPage, grantPage(enroller.SSO != nil)) // grant.go
	if enroller.SSO != nil {
		// Approving a grant by signing in on the website (acme/grantweb.go).
		pages := http.NewServeMux()
		enroller.GrantPages(pages)
		web.Handle(login.PathGrantPage+"/", limitSources(d.limiter, pages))
	}
	// TP.js, TP's client for browsers (clients/web; docs/PROTOCOL.md 14).
	web.Handle("GET /tp/web/", http.StripPrefix("/tp/web/", http.FileServerFS(tpweb.FS)))
	web.HandleFunc("/", landing)
	if err := d.newWebsite(web); err != nil { // website.go: sites beside tpd's own endpoints
		d.ca.Close()
		d.closeDB()
		return nil, err
	}

	revOpts, err := d.reverseOptions() // reverse.go
	if err != nil {
		d.ca.Close()
		d.closeDB()
		return nil, err
	}
	peers, err := d.peerOptions(revOpts) // peer.go
	if err != nil {
		d.ca.Close()
		d.closeDB()
		return nil, err
	}
	roots := x509.NewCertPool()
	roots.AddCert(d.pki.Root)
	getCert := func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return d.cert.Load(), nil }
	var ticketKeys proxy.TicketKeySource // nil: each instance makes its own
	if d.db != nil {
		ticketKeys = pgstore.NewKeys(d.db)
	}
	ipt, err := ipTunnels(cfg.IPTunnel) // iptunnel.go
	if err != nil {
		d.ca.Close()
		d.closeDB()
		return nil, err
	}
	if ipt != nil && d.metrics != nil {
		d.metrics.reg.MustRegister(ipCollector{ipt})
	}
	d.proxy, err = proxy.New(proxy.Config{
		IPTunnel:   ipt,
		TicketKeys: ticketKeys,
		ProxyTLS: &tls.Config{
			GetCertificate: getCert,
			ClientCAs:      roots,
			ClientAuth:     tls.RequireAndVerifyClientCert,
			// Runs on full and resumed handshakes alike (TLS and QUIC): a revoked or
			// deleted device cannot come back on a session ticket, and a chain that
			// reaches the root by another way than the issuing intermediate is refused.
			VerifyConnection: func(cs tls.ConnectionState) error {
				if len(cs.PeerCertificates) == 0 {
					return errors.New("client certificate required")
				}
				_, err := d.verifyClient(cs.PeerCertificates[0], cs.VerifiedChains)
				return err
			},
		},
		WebTLS:   d.webTLS(),
		Web:      http.HandlerFunc(d.serveWeb), // website.go: follows reloads
		WebNames: func(name string) bool { return d.site().KnowsName(name) },
		// CONNECT and the other HTTPS-proxy endpoints, only on proxy-names, so
		// that no website name ever asks a browser for a certificate (httpproxy.go).
		ProxyNames: proxyNameSet(cfg.ProxyNames),
		ProxyHTTP:  proxyHTTPHandler(d.discovery),
		// A name exposed with tp expose --http --devices-only asks for the device
		// certificate at the handshake; the website checks it again (revhttp.go).
		DevicesOnly: d.DevicesOnlyName,
		// Names agents expose publicly by SNI, never tpd's own or a site's (reverse.go).
		Passthrough: d.passthrough(),
		UDP:         d.udpOptions(), // quic.go
		ConnectUDP: proxy.ConnectUDPOptions{Template: cfg.ConnectUDPTemplate, MaxDatagram: cfg.ConnectUDPMaxDatagram,
			MaxPacketsPerSecond: cfg.ConnectUDPMaxPPS}, // CONNECT-UDP, RFC 9298
		WebTransport: cfg.WebTransport, // browsers' sessions (proxy/webtransport.go)
		Identify: func(cs tls.ConnectionState) (authz.Identity, error) {
			if len(cs.PeerCertificates) == 0 {
				return authz.Identity{}, errors.New("no client certificate")
			}
			return d.authz.Verify(cs.PeerCertificates[0])
		},
		Authorizer:         d.metrics.authorizer(d.authz),
		Resolver:           o.resolver,
		Logger:             log,
		HandshakeTimeout:   cfg.HandshakeTimeout,
		HelloTimeout:       cfg.HelloTimeout,
		DialTimeout:        cfg.DialTimeout,
		MaxConns:           cfg.MaxConns,
		MaxWebConns:        cfg.MaxWebConns,
		MaxHandshakesPerIP: cfg.MaxHandshakesPerIP,
		Reverse:            revOpts,
		Peers:              peers,

		MaxSessionsPerIdentity: cfg.MaxSessionsPerIdentity,
		OnSessionEnd:           d.sessionEnded, // audit.go
	})
	if err != nil {
		d.ca.Close()
		d.closeDB()
		return nil, err
	}
	// The website serves names exposed over reverse HTTP tunnels once the proxy
	// holds them (revhttp.go); a proxy without reverse HTTP tunnels has none.
	if rh, ok := any(d.proxy).(reverseHTTP); ok {
		d.setReverseHTTP(rh)
	}
	return d, nil
}

// verifyClient decides whether a device certificate may use the proxy: issued by
// TP's issuing intermediate as an end-entity clientAuth certificate (see
// authz.Issuer), then the identity check (deny list, user store). chains are the
// chains crypto/tls verified against the root; nil verifies leaf here.
func (d *Daemon) verifyClient(leaf *x509.Certificate, chains [][]*x509.Certificate) (authz.Identity, error) {
	is := authz.Issuer{Root: d.pki.Root, Intermediate: d.pki.Intermediate}
	var err error
	if chains == nil {
		err = is.VerifyLeaf(leaf, time.Now())
	} else {
		err = is.CheckChains(leaf, chains)
	}
	if err != nil {
		return authz.Identity{}, err
	}
	return d.authz.Verify(leaf)
}

// Fingerprint is the root certificate's fingerprint that dlogin pins.
func (d *Daemon) Fingerprint() string { return d.pki.Fingerprint() }

// AdminAddr is the address admin-listen listens on once Serve opened it, or "".
func (d *Daemon) AdminAddr() string {
	if a := d.adminAddr.Load(); a != nil {
		return *a
	}
	return ""
}

// Users is the user store.
func (d *Daemon) Users() users.Store { return d.users }

// Policy is the policy engine.
func (d *Daemon) Policy() *policy.Engine { return d.policy }

// DenyList is consulted on every new connection and request.
func (d *Daemon) DenyList() *authz.DenyList { return d.authz.DenyList }

func (d *Daemon) renewServerCert() error {
	// One certificate for the names and the proxy names: the proxy names are
	// served with TP's root like the tp/1 protocol.
	names := append(slices.Clone(d.cfg.Names), d.cfg.ProxyNames...)
	chain, key, leaf, err := d.pki.IssueServerCert(names, serverCertLifetime)
	if err != nil {
		return err
	}
	d.cert.Store(&tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf})
	d.metrics.certIssued("server")
	return nil
}

// Serve answers on ln (the public port) and on the admin socket until ctx ends,
// then shuts down gracefully (drain.go): it stops accepting, lets live sessions end
// for up to shutdown-timeout (or until Force), and aborts those still running (their clients see a reset that
// says the server shut down, never a clean end). The caller owns ln.
func (d *Daemon) Serve(ctx context.Context, ln net.Listener) error {
	var udp *net.UDPConn // QUIC on the same port (quic.go)
	var qopts proxy.QUICOptions
	if d.cfg.QUIC {
		var err error
		if qopts, err = d.quicOptions(); err != nil {
			return err
		}
		if udp, err = listenQUIC(ln); err != nil {
			return err
		}
		defer udp.Close()
	}
	adminLn, err := admin.Listen(d.cfg.AdminSocket())
	if err != nil {
		return err
	}
	adminSrv := &http.Server{
		Handler: (&admin.Server{
			Users: d.users, Revoker: d, Reloader: d, ServerURL: d.cfg.PublicURL(), Fingerprint: d.Fingerprint(),
			TokenTTL: d.cfg.TokenTTL, Logger: d.log,
			Status: d.Status, OnAct: d.AuditAdmin, // audit.go
		}).Handler(),
		ReadHeaderTimeout: 10 * time.Second,
	}
	var adminHTTPLn net.Listener // admin-listen (admin_http.go)
	if d.cfg.AdminListen != "" {
		if adminHTTPLn, err = listenAdminHTTP(d.cfg.AdminListen); err != nil {
			adminLn.Close()
			return err
		}
		a := adminHTTPLn.Addr().String()
		d.adminAddr.Store(&a)
	}
	g, gctx := errgroup.WithContext(ctx)
	if err := d.startWeb(gctx, g, ln); err != nil { // website.go
		adminLn.Close()
		if adminHTTPLn != nil {
			adminHTTPLn.Close()
		}
		return err
	}
	// The proxy does not run under gctx: a stop (SIGTERM) is a Shutdown below,
	// which lets sessions drain and then aborts what is left, so that no tunnel
	// ends looking complete. Cancelling the proxy's context would cut them all.
	pctx := context.WithoutCancel(gctx)
	g.Go(func() error {
		err := d.proxy.Serve(pctx, ln)
		if errors.Is(err, proxy.ErrServerClosed) {
			return nil
		}
		return err
	})
	if udp != nil {
		d.log.Info("serving QUIC", "udp", udp.LocalAddr().String())
		g.Go(func() error {
			err := d.proxy.ServeQUIC(pctx, udp, qopts)
			if errors.Is(err, proxy.ErrServerClosed) {
				return nil
			}
			return err
		})
	}
	g.Go(func() error {
		if err := adminSrv.Serve(adminLn); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	// The admin HTTP listener outlives the drain below, so that /readyz can say
	// "draining" while it lasts; it stops after the proxy did. So does this
	// instance's row in tp_instances (runPeers).
	adminHTTPDone := make(chan struct{}) // closed when the drain has ended
	if adminHTTPLn != nil {
		adminHTTP := d.adminHTTPServer()
		d.log.Info("serving metrics and health checks", "admin_listen", adminHTTPLn.Addr().String())
		g.Go(func() error {
			if err := adminHTTP.Serve(adminHTTPLn); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("admin-listen %s: %w", d.cfg.AdminListen, err)
			}
			return nil
		})
		g.Go(func() error {
			<-adminHTTPDone
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			_ = adminHTTP.Shutdown(sctx)
			return nil
		})
	}
	if d.db != nil {
		g.Go(func() error { d.db.Listen(gctx); return nil }) // other instances' changes (store.go)
		g.Go(func() error { d.pruneShared(gctx); return nil })
		g.Go(func() error { d.proxy.RunLeases(gctx); return nil })             // reverse holds' leases (proxy/holdstore.go)
		g.Go(func() error { d.runPeers(gctx, ln, adminHTTPDone); return nil }) // peer.go
	}
	g.Go(func() error { d.maintain(gctx); return nil })
	g.Go(func() error { d.pruneCA(gctx); return nil })
	if d.Ready != nil {
		d.Ready()
	}
	g.Go(func() error {
		<-gctx.Done()
		defer close(adminHTTPDone)
		d.drain(ctx, adminSrv, ln) // drain.go
		return nil
	})
	err = g.Wait()
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return nil // asked to stop
	}
	return err
}

// maintain renews tpd's own certificate and picks up policy edits until ctx ends.
func (d *Daemon) maintain(ctx context.Context) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	lastErr := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.kick:
		}
		if leaf := d.cert.Load().Leaf; time.Now().After(leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) * 2 / 3)) {
			if err := d.renewServerCert(); err != nil {
				d.log.Error("renewing tpd's certificate failed", "err", err)
			}
		}
		before := d.policy.Revision()
		// Reload directly: ReloadPolicy kicks this loop, which would spin.
		if err := d.policy.Reload(ctx); err != nil {
			fresh := err.Error() != lastErr
			d.metrics.policyReload(err, fresh)
			if fresh {
				lastErr = err.Error()
				d.log.Error("policy change refused; the previous policy stays active", "err", err)
				d.policyReloaded("policy directory change", err)
			}
		} else if d.metrics.policyReload(nil, false); lastErr != "" || d.policy.Revision() != before {
			lastErr = ""
			cached, why := d.policy.Cached()
			d.log.Info("policy reloaded", "revision", d.policy.Revision(), "decisions_cached", cached, "not_cached_because", why)
			d.policyReloaded("policy directory change", nil)
		}
		d.recheckIfChanged(ctx)
	}
}

// pruneCA removes what logins left in the CA database (acme.CA.Prune) at start
// and every ca-prune-interval until ctx ends.
func (d *Daemon) pruneCA(ctx context.Context) {
	t := time.NewTicker(d.cfg.CAPruneInterval)
	defer t.Stop()
	for {
		st, err := d.ca.Prune(ctx, time.Now(), d.cfg.CARetention)
		switch {
		case err != nil && ctx.Err() == nil:
			d.log.Error("pruning the CA database failed; it is tried again at the next interval", "err", err)
		case st.Total() > 0:
			d.log.Info("pruned the CA database", "nonces", st.Nonces, "eab_keys", st.EABKeys, "accounts", st.Accounts,
				"orders", st.Orders, "authorizations", st.Authorizations, "challenges", st.Challenges,
				"acme_certificates", st.ACMECertificates, "certificates", st.Certificates)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ReloadPolicy recompiles the policy directory if it changed; on error the
// previous policy stays active. Live sessions are re-checked against a new policy
// right after.
func (d *Daemon) ReloadPolicy(ctx context.Context) error {
	before := d.policy.Revision()
	err := d.policy.Reload(ctx)
	if err != nil || d.policy.Revision() != before {
		d.policyReloaded("reload request", err)
	}
	select {
	case d.kick <- struct{}{}:
	default:
	}
	return err
}

// Close releases the CA database, the decision log and the database pool.
func (d *Daemon) Close() error {
	d.holdsMu.Lock()
	d.holdsClosed = true // a save under way has finished
	d.holdsMu.Unlock()
	err := errors.Join(d.ca.Close(), d.decisions.Close(), d.audit.Close())
	d.closeDB()
	return err
}

func landing(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	io.WriteString(w, "<!doctype html><title>TP</title><p>This is a TP server.</p>\n")
}
