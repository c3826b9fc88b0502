package tpd

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/internal/website"
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
		return website.ReverseUpstream{}, false
	}
	up := website.ReverseUpstream{Transport: rt}
	if do, ok := ref.r.(reverseHTTPDevicesOnly); ok {
		up.DevicesOnly = do.ReverseHTTPDevicesOnly(host)
	}
	return up, true
}

// deviceRequest is website.Options.Device: the request's client certificate
// is an accepted device's (issued by TP's intermediate, device and user not
// revoked or deleted), as for a tp/1 connection. The handshake proved the
// client holds its key.
func (d *Daemon) deviceRequest(r *http.Request) error {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return errors.New("no client certificate")
	}
	_, err := d.verifyClient(r.TLS.PeerCertificates[0], nil)
	return err
}

// heldCertLifetime is the lifetime of a certificate for a reverse HTTP name;
// it is replaced at two thirds of it, and dropped once the name is not held.
const heldCertLifetime = 24 * time.Hour

// maxHeldCerts bounds the certificates kept for reverse HTTP names: past it,
// those of names no longer held go first, then the oldest.
const maxHeldCerts = 4096

// heldCerts are certificates for reverse HTTP names, issued by TP's own CA
// at the first handshake for a name while it is held, and only then: a name
// nobody holds never gets one, so the handshakes of a scan cost nothing.
type heldCerts struct {
	mu sync.Mutex
	m  map[string]*tls.Certificate
}

// heldCertificate returns the certificate for the held reverse HTTP name,
// issuing it now when there is none or it is in the last third of its life.
func (d *Daemon) heldCertificate(name string) (*tls.Certificate, error) {
	h := &d.held
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Now()
	if c := h.m[name]; c != nil && now.Before(c.Leaf.NotBefore.Add(c.Leaf.NotAfter.Sub(c.Leaf.NotBefore)*2/3)) {
		return c, nil
	}
	if h.m == nil {
		h.m = map[string]*tls.Certificate{}
	}
	if len(h.m) >= maxHeldCerts {
		d.pruneHeldLocked()
	}
	chain, key, leaf, err := d.pki.IssueServerCert([]string{name}, heldCertLifetime)
	if err != nil {
		return nil, fmt.Errorf("certificate for %s: %w", name, err)
	}
	c := &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}
	h.m[name] = c
	d.metrics.certIssued("site")
	return c, nil
}

// pruneHeldLocked drops the certificates of names no longer held, and when
// that frees nothing, the oldest. d.held.mu is held.
func (d *Daemon) pruneHeldLocked() {
	var oldest string
	for n, c := range d.held.m {
		if _, ok := d.reverseUpstream(n); !ok {
			delete(d.held.m, n)
			continue
		}
		if oldest == "" || c.Leaf.NotBefore.Before(d.held.m[oldest].Leaf.NotBefore) {
			oldest = n
		}
	}
	if len(d.held.m) >= maxHeldCerts && oldest != "" {
		delete(d.held.m, oldest)
	}
}

// DevicesOnlyName reports whether name is a reverse HTTP name held right now
// whose exposer chose devices only. It is the hook for the handshake: the
// proxy should give such a name (a ClientHello without "tp/1") a website TLS
// configuration that requires and verifies the device certificate, as on the
// proxy names, and keep sending its requests to the website handler, which
// checks the certificate again (website.Options.Device) and refuses a request
// without one with 403. Until the proxy asks, browsers and devices alike get
// that 403: the name fails closed.
func (d *Daemon) DevicesOnlyName(name string) bool {
	up, ok := d.reverseUpstream(strings.TrimSuffix(strings.ToLower(name), "."))
	return ok && up.DevicesOnly
}
