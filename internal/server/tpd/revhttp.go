package tpd

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/website"
)

// reverseHTTP is what the website needs of the proxy's reverse registry for
// names exposed over a reverse HTTP tunnel (draft-kazuho-httpbis-reverse-tunnel,
// tp expose --http): the round-tripper that carries requests down the tunnel
// holding host (LABEL.<reverse-zone>), while one holds it.
// (*proxy.Server).ReverseHTTP implements it.
type reverseHTTP interface {
	ReverseHTTP(host string) (http.RoundTripper, bool)
}

// reverseHTTPDevicesOnly is implemented by a registry whose exposers may ask
// that only enrolled devices reach their name (a field of the tunnel request):
// tpd asks it for each request to a held name. A registry without it exposes
// every name to everyone.
type reverseHTTPDevicesOnly interface {
	ReverseHTTPDevicesOnly(host string) bool
}

// revHTTPRef holds the registry behind an atomic pointer: New sets the
// proxy's, tests their own.
type revHTTPRef struct{ r reverseHTTP }

// setReverseHTTP makes r the source of reverse HTTP names.
func (d *Daemon) setReverseHTTP(r reverseHTTP) { d.revHTTP.Store(&revHTTPRef{r}) }

// reverseUpstream is website.Options.Reverse: a held reverse HTTP name's
// round-tripper, and whether it is for devices only. Names outside the
// reverse zone are never looked up.
func (d *Daemon) reverseUpstream(host string) (website.ReverseUpstream, bool) {
	ref := d.revHTTP.Load()
	zone := strings.ToLower(strings.TrimSuffix(d.cfg.ReverseZone, "."))
	if ref == nil || zone == "" || !strings.HasSuffix(host, "."+zone) {
		return website.ReverseUpstream{}, false
	}
	rt, ok := ref.r.ReverseHTTP(host)
	if !ok || rt == nil {
		return d.peerUpstream(host)
	}
	up := website.ReverseUpstream{Transport: rt}
	if do, ok := rt.(interface{ DevicesOnly() bool }); ok {
		up.DevicesOnly = do.DevicesOnly() // the access rt sends requests to tunnels with
	} else if do, ok := ref.r.(reverseHTTPDevicesOnly); ok {
		up.DevicesOnly = do.ReverseHTTPDevicesOnly(host)
	}
	return up, true
}

// peerUpstream is the upstream of a reverse HTTP name whose tunnels another
// instance holds (docs/SCALE.md, "Peering"): the request is carried there over
// a peer connection, with the device this instance verified. A devices-only
// name (its route says so) is enforced here as for a local one (the handshake
// asks for the device certificate, the handler checks it) and again there.
func (d *Daemon) peerUpstream(host string) (website.ReverseUpstream, bool) {
	if d.proxy == nil || d.routes == nil {
		return website.ReverseUpstream{}, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), d.cfg.DialTimeout)
	defer cancel()
	rt, devicesOnly, ok := d.proxy.PeerHTTP(ctx, host, func(r *http.Request) string {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			return ""
		}
		id, err := d.unscopedDevice(r.TLS.PeerCertificates[0])
		if err != nil {
			return "" // the serving instance then refuses a devices-only name
		}
		return id.DeviceID
	})
	if !ok {
		return website.ReverseUpstream{}, false
	}
	return website.ReverseUpstream{Transport: rt, DevicesOnly: devicesOnly}, true
}

// deviceRequest is website.Options.Device: the request's client certificate
// is an accepted device's (issued by TP's intermediate, device and user not
// revoked or deleted), as for a tp/1 connection. The handshake proved the
// client holds its key.
func (d *Daemon) deviceRequest(r *http.Request) error {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return errors.New("no client certificate")
	}
	_, err := d.unscopedDevice(r.TLS.PeerCertificates[0])
	return err
}

// unscopedDevice is verifyClient for a device that reaches an app as a
// person's device does (a devices-only reverse HTTP name): a scoped device
// (authz.Scope) may only keep its own name exposed, so it is refused.
func (d *Daemon) unscopedDevice(leaf *x509.Certificate) (authz.Identity, error) {
	id, err := d.verifyClient(leaf, nil)
	if err != nil {
		return id, err
	}
	if sc := d.users.Scope(id.DeviceID); sc.Guest() != "" {
		return id, fmt.Errorf("%s is a guest that may only connect to %s (scope %s), not reach apps of the website", id.DeviceID, sc.Guest(), sc)
	} else if sc != "" {
		return id, fmt.Errorf("%s holds a credential that may only keep %s exposed (scope %s), not reach other apps", id.DeviceID, sc.Label(), sc)
	}
	return id, nil
}

// maxExposedCerts bounds the certificates of exposed names kept in memory;
// past it certmagic evicts some and loads them again from storage when needed.
const maxExposedCerts = 4096

// exposedIssueBurst and exposedIssueEvery bound how fast certificates for
// exposed names are ordered: a burst, then one per interval. Only held names
// are ever ordered; this bounds a client that holds and drops names in a loop.
const (
	exposedIssueBurst = 32
	exposedIssueEvery = 10 * time.Second
)

// issueBucket is a token bucket: at most burst orders at once, refilled by one
// every interval.
type issueBucket struct {
	mu     sync.Mutex
	tokens float64
	last   time.Time
}

func (b *issueBucket) take(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.last.IsZero() {
		b.tokens = exposedIssueBurst
	} else {
		b.tokens = min(exposedIssueBurst, b.tokens+float64(now.Sub(b.last))/float64(exposedIssueEvery))
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// heldName reports whether a reverse HTTP tunnel holds name now: the embedded
// CA's sites provisioner certifies such names (acme.CAOptions.SiteHeld).
func (d *Daemon) heldName(name string) bool {
	_, ok := d.reverseUpstream(strings.TrimSuffix(strings.ToLower(name), "."))
	return ok
}

// allowExposedCert is certmagic's on-demand decision for exposed names: a
// certificate is loaded or ordered only for a name a reverse HTTP tunnel holds
// now, and orders are rate-bound, so a scan of random names costs no order.
func (d *Daemon) allowExposedCert(_ context.Context, name string) error {
	if !d.heldName(name) {
		return fmt.Errorf("%s is not held by an HTTP exposure", name)
	}
	if !d.exposedIssue.take(time.Now()) {
		return fmt.Errorf("certificate for %s: too many orders for exposed names; at most %d at once, then one per %s", name, exposedIssueBurst, exposedIssueEvery)
	}
	return nil
}

// manageExposedCerts prepares on-demand certificates for names exposed with
// tp expose --http, from the sites' ACME directory (acme-ca, or the embedded
// CA's tp-sites provisioner), stored with the sites'.
func (d *Daemon) manageExposedCerts(env *certEnv) (*website.Certs, error) {
	dir, roots, err := d.siteDirectory(env.public)
	if err != nil {
		return nil, err
	}
	tcp, _ := env.public.(*net.TCPAddr)
	o := website.CertOptions{
		Storage: d.cfg.SitesDir(), Shared: d.siteStorage(dir), CA: dir, Email: d.cfg.ACMEEmail, TrustedRoots: roots,
		TLSALPNPort: tcp.Port, HTTPPort: env.httpPort, Logger: d.log,
		OnDemand: d.allowExposedCert, Capacity: maxExposedCerts,
		Obtaining: func(string) { d.exposedOrders.Add(1) },
	}
	if !tcp.IP.IsUnspecified() {
		o.ListenHost = tcp.IP.String()
	}
	if d.cfg.ACMECA == "" {
		o.EAB = d.ca.NewSiteEAB
	}
	certs, err := website.NewCerts(o)
	if err != nil {
		return nil, fmt.Errorf("certificates for exposed names: %w", err)
	}
	d.log.Info("certificates for names exposed with tp expose --http: on demand while held", "zone", d.cfg.ReverseZone, "acme", dir)
	return certs, nil
}

// DevicesOnlyName reports whether name is a reverse HTTP name held right now,
// here or on another instance (its route says so), whose exposer chose
// devices only. It is proxy.Config.DevicesOnly, the hook for the handshake:
// the proxy gives such a name (a ClientHello without "tp/1") a website TLS
// configuration that requires and verifies the device certificate, and the
// website handler checks the certificate again (website.Options.Device),
// refusing a request without one with 403.
func (d *Daemon) DevicesOnlyName(name string) bool {
	up, ok := d.reverseUpstream(strings.TrimSuffix(strings.ToLower(name), "."))
	return ok && up.DevicesOnly
}
