package acme

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/smallstep/certificates/authority/provisioner"
)

// leafFrom is a certificate as the authority holds it before signing: names,
// and the provisioner extension of the provisioner named prov.
func leafFrom(t *testing.T, prov string, names ...string) *x509.Certificate {
	t.Helper()
	ext, err := (&provisioner.Extension{Type: provisioner.TypeACME, Name: prov}).ToExtension()
	if err != nil {
		t.Fatal(err)
	}
	return &x509.Certificate{DNSNames: names, ExtraExtensions: []pkix.Extension{ext}}
}

// The websites' names follow SetSiteNames while the CA runs. Bad inputs: a
// website certificate for blog.example.test before it is a site, and for
// www.example.test after it stopped being one; both are refused at signing.
// Certificates of other provisioners pass; a CA started without the websites'
// provisioner refuses SetSiteNames.
func TestSiteNamesLive(t *testing.T) {
	ts := newTestServerWith(t, CAOptions{SiteNames: []string{"www.example.test"}})
	enf := siteEnforcer{ts.CA}
	if err := enf.Enforce(leafFrom(t, SitesProvisionerName, "www.example.test")); err != nil {
		t.Errorf("configured site refused: %v", err)
	}
	if err := enf.Enforce(leafFrom(t, SitesProvisionerName, "blog.example.test")); err == nil {
		t.Error("blog.example.test certified before it is a site")
	}
	if err := ts.CA.SetSiteNames([]string{"blog.example.test"}); err != nil {
		t.Fatal(err)
	}
	if err := enf.Enforce(leafFrom(t, SitesProvisionerName, "blog.example.test")); err != nil {
		t.Errorf("site added live refused: %v", err)
	}
	if err := enf.Enforce(leafFrom(t, SitesProvisionerName, "blog.example.test", "www.example.test")); err == nil {
		t.Error("www.example.test certified after it was removed")
	}
	if err := enf.Enforce(leafFrom(t, ProvisionerName, "anything.example.test")); err != nil {
		t.Errorf("a device provisioner's certificate was judged as a website's: %v", err)
	}
	if !(siteClient{c: ts.CA}).isSite("BLOG.example.test") || (siteClient{c: ts.CA}).isSite("www.example.test") {
		t.Error("challenge validation does not follow the live site names")
	}

	off := newTestServerWith(t, CAOptions{})
	if err := off.CA.SetSiteNames([]string{"www.example.test"}); !errors.Is(err, ErrSitesOff) {
		t.Errorf("SetSiteNames on a CA without the websites' provisioner: %v", err)
	}
}

// Bad input: a certificate whose provisioner extension is missing (a
// provisioner that stopped writing it) is refused, not waved through as "not a
// website certificate".
func TestSiteEnforcerFailsClosed(t *testing.T) {
	ts := newTestServerWith(t, CAOptions{SiteNames: []string{"www.example.test"}})
	if err := (siteEnforcer{ts.CA}).Enforce(&x509.Certificate{DNSNames: []string{"blog.example.test"}}); err == nil {
		t.Fatal("a certificate without a provisioner extension was let through")
	}
}

// Names held by an HTTP exposure (CAOptions.SiteHeld) are certified by the
// websites' provisioner while held, and only then. Bad inputs: a website
// certificate for a name nobody holds, for a held name together with one not
// held, and for the name after it was released; all refused at signing, and
// challenges for them are not validated against tpd.
func TestSiteEnforcerHeldNames(t *testing.T) {
	var mu sync.Mutex
	held := map[string]bool{"app.rev.example.test": true}
	ts := newTestServerWith(t, CAOptions{SiteNames: []string{"www.example.test"}, SiteHeld: func(n string) bool {
		mu.Lock()
		defer mu.Unlock()
		return held[n]
	}})
	enf := siteEnforcer{ts.CA}
	if err := enf.Enforce(leafFrom(t, SitesProvisionerName, "App.rev.example.test")); err != nil {
		t.Errorf("a held name refused: %v", err)
	}
	if err := enf.Enforce(leafFrom(t, SitesProvisionerName, "www.example.test", "app.rev.example.test")); err != nil {
		t.Errorf("a site and a held name refused: %v", err)
	}
	for _, names := range [][]string{{"scan.rev.example.test"}, {"app.rev.example.test", "scan.rev.example.test"}} {
		if err := enf.Enforce(leafFrom(t, SitesProvisionerName, names...)); err == nil || !strings.Contains(err.Error(), "scan.rev.example.test") {
			t.Errorf("%v with scan.rev.example.test not held: %v, want refused naming it", names, err)
		}
	}
	if !(siteClient{c: ts.CA}).isSite("app.rev.example.test") || (siteClient{c: ts.CA}).isSite("scan.rev.example.test") {
		t.Error("challenge validation does not follow the held names")
	}
	mu.Lock()
	delete(held, "app.rev.example.test")
	mu.Unlock()
	if err := enf.Enforce(leafFrom(t, SitesProvisionerName, "app.rev.example.test")); err == nil {
		t.Error("app.rev.example.test certified after it was released")
	}
	if (siteClient{c: ts.CA}).isSite("app.rev.example.test") {
		t.Error("a released name's challenge is still validated against tpd")
	}
}
