package authz_test

import (
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// Device certificates are accepted only from the issuing intermediate, only as
// end-entity certificates, and only with clientAuth named explicitly. Each bad
// input is minted with the real root and intermediate of the test CA.
func TestIssuerVerifyLeaf(t *testing.T) {
	ca := testpki.New(t)
	is := authz.Issuer{Root: ca.Root, Intermediate: ca.Intermediate}
	other := testpki.NewIntermediate(t, ca.RootSigner(), "Second Intermediate under the same root")
	foreign := testpki.New(t)
	const dev = "alice@laptop"
	for _, tc := range []struct {
		name string
		cert func() *x509.Certificate
		want string // "" accepts
	}{
		{"good: issued by the intermediate", func() *x509.Certificate {
			return testpki.DeviceCert(t, ca.IntermediateSigner(), dev, nil).Leaf
		}, ""},
		{"signed directly by the root", func() *x509.Certificate {
			return testpki.DeviceCert(t, ca.RootSigner(), dev, nil).Leaf
		}, "not by this TP server's issuing CA"},
		{"signed by a second intermediate under the same root", func() *x509.Certificate {
			return testpki.DeviceCert(t, other, dev, nil).Leaf
		}, "not by this TP server's issuing CA"},
		{"from another CA", func() *x509.Certificate {
			return testpki.DeviceCert(t, foreign.IntermediateSigner(), dev, nil).Leaf
		}, "not by this TP server's issuing CA"},
		{"CA:TRUE leaf from the intermediate", func() *x509.Certificate {
			return testpki.DeviceCert(t, ca.IntermediateSigner(), dev, func(c *x509.Certificate) {
				c.BasicConstraintsValid, c.IsCA = true, true
			}).Leaf
		}, "CA:TRUE"},
		{"no extended key usage at all", func() *x509.Certificate {
			return testpki.DeviceCert(t, ca.IntermediateSigner(), dev, func(c *x509.Certificate) { c.ExtKeyUsage = nil }).Leaf
		}, "no clientAuth"},
		{"anyExtendedKeyUsage only", func() *x509.Certificate {
			return testpki.DeviceCert(t, ca.IntermediateSigner(), dev, func(c *x509.Certificate) {
				c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageAny}
			}).Leaf
		}, "no clientAuth"},
		{"serverAuth only", func() *x509.Certificate {
			return testpki.DeviceCert(t, ca.IntermediateSigner(), dev, func(c *x509.Certificate) {
				c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
			}).Leaf
		}, "no clientAuth"},
		{"expired", func() *x509.Certificate {
			return testpki.DeviceCert(t, ca.IntermediateSigner(), dev, func(c *x509.Certificate) {
				c.NotBefore, c.NotAfter = time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour)
			}).Leaf
		}, "expired"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaf := tc.cert()
			err := is.VerifyLeaf(leaf, time.Now())
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v; want a refusal saying %q", err, tc.want)
			}
			// The check on chains crypto/tls verified against the root alone
			// (as ClientCAs does) must decide the same.
			roots, inters := x509.NewCertPool(), x509.NewCertPool()
			roots.AddCert(ca.Root)
			inters.AddCert(ca.Intermediate)
			inters.AddCert(other.Cert)
			chains, verr := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
			if verr != nil {
				return // crypto/tls refuses it before VerifyConnection runs
			}
			if err := is.CheckChains(leaf, chains); (err == nil) != (tc.want == "") {
				t.Fatalf("CheckChains on chains to the root: %v; want refusal %v", err, tc.want != "")
			}
		})
	}
}
