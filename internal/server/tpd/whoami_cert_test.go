package tpd

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
)

// A device whose device key is gone (bad state: device.key deleted) still
// learns the truth from whoami, proving itself with its certificate's key:
// accepted, then revoked. It once got only "device key missing".
func TestWhoamiWithoutDeviceKey(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, allowAlice)
	c, _, _ := enrollClient(t, d, url, "alice", "laptop")
	ctx := context.Background()
	if _, err := c.Login(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(c.Home.Dir, "device.key")); err != nil {
		t.Fatal(err)
	}
	who, err := c.Whoami(ctx)
	if err != nil {
		t.Fatalf("whoami without the device key: %v", err)
	}
	if who.Revoked || who.Certificate == nil || !who.Certificate.Accepted {
		t.Fatalf("whoami without the device key, before any revocation: %+v %+v", who, who.Certificate)
	}
	d.DenyList().Add(authz.DenyDevice, "alice@laptop")
	if who, err = c.Whoami(ctx); err != nil || !who.Revoked || who.Certificate == nil || who.Certificate.Accepted {
		t.Fatalf("whoami without the device key, device revoked: %+v, %v", who, err)
	}

	// Bad input: alice's certificate with a signature by another key, and a
	// signature by alice's certificate key for another device ID.
	cert, err := c.Home.Certificate()
	if err != nil {
		t.Fatal(err)
	}
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	hc := login.HTTPClient(c.Root)
	var se *login.ServerError
	if _, err := login.WhoamiByCertificate(ctx, hc, url, "alice@laptop", other, cert.Certificate...); !errors.As(err, &se) || se.Status != http.StatusForbidden {
		t.Errorf("whoami signed by a key that is not the certificate's: %v", err)
	}
	enrollClient(t, d, url, "bob", "phone")
	if _, err := login.WhoamiByCertificate(ctx, hc, url, "bob@phone", cert.PrivateKey.(*ecdsa.PrivateKey), cert.Certificate...); !errors.As(err, &se) || se.Status != http.StatusForbidden {
		t.Errorf("whoami for bob@phone with alice's certificate: %v", err)
	}
}
