package tpd

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"net/http"
	"testing"

	acmeproto "github.com/mholt/acmez/v3/acme"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Reverse-name certificates are for servers only, and their provisioner takes no
// account from anyone who does not hold a name: nobody can fill the CA database
// without credentials, and no reverse certificate can pass as a client.
func TestReverseCertificatesServerOnlyAndBound(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, reversePolicy)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	stop, _ := startAgent(t, alice, "tls", testnet.Echo(t), []string{"bob"}, nil)
	defer stop()

	cert, err := alice.ReverseCertificate(context.Background(), "svc.rev.tp.internal")
	if err != nil {
		t.Fatal(err)
	}
	if eku := cert.Leaf.ExtKeyUsage; len(eku) != 1 || eku[0] != x509.ExtKeyUsageServerAuth {
		t.Errorf("reverse certificate ExtKeyUsage %v, want serverAuth only", eku)
	}

	// An ACME account without a binding (bad input: no credentials at all).
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c := &acmeproto.Client{Directory: url + login.ReverseDirectoryPath, HTTPClient: login.HTTPClient(alice.Root)}
	if _, err := c.NewAccount(context.Background(), acmeproto.Account{TermsOfServiceAgreed: true, PrivateKey: key}); err == nil {
		t.Fatal("the reverse provisioner created an account without an external account binding")
	}
}

// A device on the deny list gets no attestation (so no new certificate) and
// whoami reports it as revoked.
func TestDenyListedDeviceCannotLogIn(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, allowAlice)
	c, _, _ := enrollClient(t, d, url, "alice", "laptop")
	d.DenyList().Add(authz.DenyDevice, "alice@laptop")
	_, err := c.Login(context.Background(), nil)
	var se *login.ServerError
	if !errors.As(err, &se) || se.Status != http.StatusForbidden {
		t.Fatalf("deny-listed device logged in: %v", err)
	}
	who, err := c.Whoami(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !who.Revoked {
		t.Error("whoami does not report the deny-listed device as revoked")
	}
	d.DenyList().Remove(authz.DenyDevice, "alice@laptop")
	if _, err := c.Login(context.Background(), nil); err != nil {
		t.Fatalf("after removal from the deny list: %v", err)
	}
}

// Names under the reverse zone that are not one-label reverse names (bad input:
// "a.b.<zone>", the zone itself) are refused without a DNS lookup or a dial.
func TestReverseZoneNeverLeaksToDNS(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, reversePolicy)
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	dl, err := bob.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	defer dl.Close()
	dl.Transport = "tls"
	for _, host := range []string{"a.b.rev.tp.internal", "rev.tp.internal", "REV.TP.INTERNAL."} {
		_, err := dl.DialContext(context.Background(), "tcp", host+":22")
		var re *clients.RefusedError
		if !errors.As(err, &re) || re.Code != wire.CodeReverseUnknown {
			t.Errorf("dial %s: %v; want %s", host, err, wire.CodeReverseUnknown)
		}
	}
}
