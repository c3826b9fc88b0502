package tpd

import (
	"crypto/tls"
	"crypto/x509"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smallstep/certificates/authority/provisioner"

	"github.com/tp-proxy/tp/acme"
)

// An exposed name's certificate comes by ACME, as a configured site's: at the
// first handshake while the name is held, certmagic orders it from the
// embedded CA's tp-sites provisioner (the leaf carries that provisioner's
// extension, serverAuth only, the sites' lifetime) and stores it with the
// sites'. Bad inputs: handshakes for names nobody holds (a scan) are refused
// with unrecognized_name, make no ACME order and store nothing; after the
// tunnel goes, a new handshake for the name is refused too; held again, the
// stored certificate is served without a new order.
func TestReverseHTTPCertACME(t *testing.T) {
	t.Parallel()
	e := startRevHTTP(t)
	const app = "acme.rev.tp.internal"
	root := rootPool(e.d)
	dial := func(name string) (*x509.Certificate, error) {
		c, err := tls.Dial("tcp", e.d.cfg.Listen, &tls.Config{ServerName: name, RootCAs: root, NextProtos: []string{"h2", "http/1.1"}})
		if err != nil {
			return nil, err
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0], nil
	}

	for _, scan := range []string{"scan1.rev.tp.internal", "www.rev.tp.internal", "acme2.rev.tp.internal"} {
		if _, err := dial(scan); err == nil || !strings.Contains(err.Error(), "unrecognized name") {
			t.Errorf("handshake for %s, held by nobody: %v, want the unrecognized_name alert", scan, err)
		}
		if err := e.d.allowExposedCert(t.Context(), scan); err == nil {
			t.Errorf("the on-demand decision allows %s, held by nobody", scan)
		}
	}
	if n := e.d.exposedOrders.Load(); n != 0 {
		t.Fatalf("%d ACME orders for names nobody holds, want none", n)
	}

	e.reg.hold(app, testHeld{rt: e.rt})
	leaf, err := dial(app)
	if err != nil {
		t.Fatalf("handshake for the held name %s: %v", app, err)
	}
	ext, ok := provisioner.GetProvisionerExtension(leaf)
	if !ok || ext.Name != acme.SitesProvisionerName || ext.Type != provisioner.TypeACME {
		t.Errorf("the certificate for %s came from provisioner %+v (found %v), want the ACME provisioner %s", app, ext, ok, acme.SitesProvisionerName)
	}
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != app || len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth ||
		leaf.NotAfter.Sub(leaf.NotBefore) > acme.SiteCertLifetime+time.Minute {
		t.Errorf("the certificate for %s: names %v, ext key usage %v, lifetime %s; want only the name, serverAuth, at most %s",
			app, leaf.DNSNames, leaf.ExtKeyUsage, leaf.NotAfter.Sub(leaf.NotBefore), acme.SiteCertLifetime)
	}
	if n := e.d.exposedOrders.Load(); n != 1 {
		t.Errorf("%d ACME orders after the first handshake for %s, want 1", n, app)
	}
	stored, _ := filepath.Glob(filepath.Join(e.d.cfg.SitesDir(), "certificates", "*", "*", "*.crt"))
	if len(stored) != 1 || filepath.Base(stored[0]) != app+".crt" {
		t.Errorf("certmagic's storage holds %v, want only %s's certificate", stored, app)
	}
	for _, s := range stored {
		if !strings.Contains(s, acme.SitesProvisionerName) {
			t.Errorf("%s is not stored under the tp-sites directory's issuer", s)
		}
	}

	e.reg.drop(app)
	if _, err := dial(app); err == nil || !strings.Contains(err.Error(), "unrecognized name") {
		t.Errorf("new handshake for %s after its tunnel went: %v, want the unrecognized_name alert", app, err)
	}
	e.reg.hold(app, testHeld{rt: e.rt})
	again, err := dial(app)
	if err != nil {
		t.Fatalf("handshake for %s held again: %v", app, err)
	}
	if !again.Equal(leaf) || e.d.exposedOrders.Load() != 1 {
		t.Errorf("held again, %s got serial %s (first %s) after %d orders; want the same certificate and no new order",
			app, again.SerialNumber, leaf.SerialNumber, e.d.exposedOrders.Load())
	}

	// A devices-only name: the CA's tls-alpn-01 handshake (no device
	// certificate) is answered, so the name gets its certificate, while a
	// browser without a device certificate is still refused.
	const private = "private-acme.rev.tp.internal"
	e.reg.hold(private, testHeld{rt: e.rt, devicesOnly: true})
	if err := firstRead(e.d.cfg.Listen, &tls.Config{ServerName: private, RootCAs: root, NextProtos: []string{"http/1.1"}}); err == nil ||
		!strings.Contains(err.Error(), "certificate required") {
		t.Errorf("devices-only %s without a device certificate: %v, want the certificate_required alert", private, err)
	}
	if stored, _ := filepath.Glob(filepath.Join(e.d.cfg.SitesDir(), "certificates", "*", private, private+".crt")); len(stored) != 1 || e.d.exposedOrders.Load() != 2 {
		t.Errorf("devices-only %s: stored %v after %d orders; want its certificate, by a second order", private, stored, e.d.exposedOrders.Load())
	}
}

// Orders for exposed names are rate-bound: a burst, then one per interval.
// Bad input: one order more than the burst at once is refused, and allowed
// again only once an interval has passed (the times are given, not waited for).
func TestExposedIssueBucket(t *testing.T) {
	t.Parallel()
	var b issueBucket
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := range exposedIssueBurst {
		if !b.take(now) {
			t.Fatalf("order %d of a burst of %d refused", i+1, exposedIssueBurst)
		}
	}
	if b.take(now) {
		t.Fatalf("order %d at once allowed, want at most %d", exposedIssueBurst+1, exposedIssueBurst)
	}
	if b.take(now.Add(exposedIssueEvery / 2)) {
		t.Error("an order allowed half an interval after the burst")
	}
	if !b.take(now.Add(exposedIssueEvery + exposedIssueEvery/2)) {
		t.Error("an order refused after the bucket refilled by one")
	}
}
