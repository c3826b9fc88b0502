package clients

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// A tp process reading its certificate while another renews it never sees the
// new key beside the old certificate as an error.
func TestCertificateDuringRenewal(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	var creds []*login.Credentials
	for range 2 {
		c := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
		creds = append(creds, &login.Credentials{Chain: []*x509.Certificate{c.Leaf, ca.Intermediate}, Key: c.PrivateKey.(*ecdsa.PrivateKey)})
	}
	h := Home{Dir: t.TempDir()}
	if err := h.SaveCredentials(creds[0]); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{}) // the writer is done
	quit := make(chan struct{}) // the reader failed: the writer stops
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(stop)
		for i := 0; i < 200; i++ {
			select {
			case <-quit:
				return
			default:
			}
			if err := h.SaveCredentials(creds[i%2]); err != nil {
				t.Error(err)
				return
			}
			// Renewals are hours apart; a few milliseconds apart, every read
			// still overlaps a write, and a reader's retries (20 ms apart) can
			// tell a renewal in progress from one that never ends.
			time.Sleep(2 * time.Millisecond)
		}
	}()
	for {
		select {
		case <-stop:
			wg.Wait()
			return
		default:
		}
		if _, err := h.Certificate(); err != nil {
			close(quit)
			wg.Wait()
			t.Fatalf("reading during a renewal: %v", err)
		}
	}
}

// The moment between a renewal's two renames, made to last: key.pem is the
// new key with its chain, cert.pem still the old certificate (the bad input is
// that mismatched pair). Certificate must answer the new pair at once, from
// key.pem alone, whatever cert.pem holds; a reader that paired the two files
// would see a mismatch for as long as the renewal's second write takes.
func TestCertificateBetweenRenewalRenames(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	old := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	renewed := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	h := Home{Dir: t.TempDir()}
	if err := h.SaveCredentials(&login.Credentials{Chain: []*x509.Certificate{old.Leaf, ca.Intermediate}, Key: old.PrivateKey.(*ecdsa.PrivateKey)}); err != nil {
		t.Fatal(err)
	}
	stale, err := os.ReadFile(h.path(certFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SaveCredentials(&login.Credentials{Chain: []*x509.Certificate{renewed.Leaf, ca.Intermediate}, Key: renewed.PrivateKey.(*ecdsa.PrivateKey)}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(h.path(certFile), stale, 0o644); err != nil { // the second rename has not happened yet
		t.Fatal(err)
	}
	c, err := h.Certificate()
	if err != nil {
		t.Fatalf("Certificate between a renewal's renames: %v", err)
	}
	if !bytes.Equal(c.Certificate[0], renewed.Leaf.Raw) || len(c.Certificate) != 2 {
		t.Fatalf("Certificate = leaf %x… (%d certs); want the renewed leaf and its intermediate", c.Certificate[0][:8], len(c.Certificate))
	}
}

// A home written before key.pem carried the chain (key.pem holds only the key)
// still loads, from cert.pem beside it.
func TestCertificateKeyOnlyHome(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	cc := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	h := Home{Dir: t.TempDir()}
	kb, err := login.PEMKey(cc.PrivateKey.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(h.path(keyFile), kb, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(h.path(certFile), append(login.PEMCert(cc.Leaf), login.PEMCert(ca.Intermediate)...), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := h.Certificate()
	if err != nil {
		t.Fatalf("Certificate of a key-only key.pem: %v", err)
	}
	if !bytes.Equal(c.Certificate[0], cc.Leaf.Raw) {
		t.Fatal("Certificate did not load cert.pem's leaf")
	}
}

// A trailing "/" after the address is the base URL all the same: it is kept
// out of the URLs the client builds (it once made "https://ADDR//tp/v1/roots"),
// and the port stays 443 when none is given.
func TestServerBaseURLTrailingSlash(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"https://tp.example.org:8443/": "https://tp.example.org:8443",
		"https://tp.example.org":       "https://tp.example.org",
	} {
		if got, err := ServerBaseURL(in); err != nil || got != want {
			t.Errorf("ServerBaseURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if got, err := ServerAddr("https://tp.example.org/"); err != nil || got != "tp.example.org:443" {
		t.Errorf(`ServerAddr("https://tp.example.org/") = %q, %v; want "tp.example.org:443"`, got, err)
	}
}

// Bad input: a home whose device.key was deleted, with an expired certificate.
// tp once said "… renewing it failed: device key missing …; enroll this device
// again with dlogin --token; run dlogin": neither works without the key, and
// the token must come from an administrator's tpd enroll.
func TestExpiredCertificateWithoutDeviceKey(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	now := time.Now()
	cc := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{NotBefore: now.Add(-5 * time.Hour), NotAfter: now.Add(-time.Hour)})
	h := Home{Dir: t.TempDir()}
	p := Profile{Server: "https://127.0.0.1:1", DeviceID: "alice@laptop"}
	if err := h.SaveProfile(p); err != nil {
		t.Fatal(err)
	}
	kb, err := login.PEMKey(cc.PrivateKey.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(h.path(keyFile), append(kb, login.PEMCert(cc.Leaf)...), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &Client{Home: h, Profile: p, Root: ca.Root}
	_, err = c.Certificate(t.Context())
	if !errors.Is(err, ErrNoDeviceKey) {
		t.Fatalf("Certificate = %v; want ErrNoDeviceKey", err)
	}
	msg := err.Error()
	for _, want := range []string{"expired", "cannot be renewed", "tpd enroll alice --device laptop", "then run the dlogin line it prints"} {
		if !strings.Contains(msg, want) {
			t.Errorf("the error does not say %q: %s", want, msg)
		}
	}
	for _, wrong := range []string{"run dlogin", "dlogin --token"} {
		if strings.Contains(msg, wrong) {
			t.Errorf("the error says %q, which cannot work without the device key: %s", wrong, msg)
		}
	}
}
