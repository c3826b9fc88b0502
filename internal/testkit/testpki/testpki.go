// Package testpki mints certificates for tests: a root and intermediate shaped like
// TP's embedded CA, server certificates, and device client certificates carrying the
// permanentIdentifier SAN that TP's CA puts in attested certificates.
package testpki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
)

// CA is a root plus an intermediate that signs leaves.
type CA struct {
	Root            *x509.Certificate
	RootKey         crypto.Signer
	Intermediate    *x509.Certificate
	IntermediateKey crypto.Signer
	// Pool holds Root only.
	Pool *x509.CertPool
}

// New makes a fresh CA. Every call makes new keys, so two CAs never trust each other.
func New(t testing.TB) *CA {
	t.Helper()
	rootKey := newKey(t)
	now := time.Now()
	rootTmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "TP Test Root CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	root := create(t, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	intKey := newKey(t)
	intTmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "TP Test Intermediate CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	inter := create(t, intTmpl, root, intKey.Public(), rootKey)
	pool := x509.NewCertPool()
	pool.AddCert(root)
	return &CA{Root: root, RootKey: rootKey, Intermediate: inter, IntermediateKey: intKey, Pool: pool}
}

// LeafOptions adjust a leaf certificate.
type LeafOptions struct {
	NotBefore, NotAfter time.Time          // zero: now-1m .. now+4h
	ExtKeyUsage         []x509.ExtKeyUsage // nil: the leaf's default
}

// ServerCert returns a serverAuth certificate for names (DNS names or IPs) with the
// intermediate in its chain.
func (ca *CA) ServerCert(t testing.TB, names ...string) tls.Certificate {
	t.Helper()
	tmpl := ca.leafTemplate(LeafOptions{}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth})
	tmpl.Subject = pkix.Name{CommonName: names[0]}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	return ca.issue(t, tmpl)
}

// ClientCert returns a device certificate like the ones TP's CA issues through
// device-attest-01: CN and permanentIdentifier SAN set to deviceID, clientAuth only.
func (ca *CA) ClientCert(t testing.TB, deviceID string, opts LeafOptions) tls.Certificate {
	t.Helper()
	tmpl := ca.leafTemplate(opts, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	tmpl.Subject = pkix.Name{CommonName: deviceID}
	tmpl.ExtraExtensions = []pkix.Extension{PermanentIdentifierSAN(t, deviceID)}
	return ca.issue(t, tmpl)
}

func (ca *CA) leafTemplate(opts LeafOptions, defEKU []x509.ExtKeyUsage) *x509.Certificate {
	now := time.Now()
	nb, na := opts.NotBefore, opts.NotAfter
	if nb.IsZero() {
		nb = now.Add(-time.Minute)
	}
	if na.IsZero() {
		na = now.Add(4 * time.Hour)
	}
	eku := opts.ExtKeyUsage
	if eku == nil {
		eku = defEKU
	}
	return &x509.Certificate{
		NotBefore:   nb,
		NotAfter:    na,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: eku,
	}
}

func (ca *CA) issue(t testing.TB, tmpl *x509.Certificate) tls.Certificate {
	t.Helper()
	tmpl.SerialNumber = serial(t)
	key := newKey(t)
	leaf := create(t, tmpl, ca.Intermediate, key.Public(), ca.IntermediateKey)
	return tls.Certificate{
		Certificate: [][]byte{leaf.Raw, ca.Intermediate.Raw},
		PrivateKey:  key,
		Leaf:        leaf,
	}
}

// PermanentIdentifierSAN encodes a subjectAltName extension holding one RFC 4043
// permanentIdentifier otherName with the given value, as step-ca writes it.
func PermanentIdentifierSAN(t testing.TB, value string) pkix.Extension {
	t.Helper()
	ext, err := authz.PermanentIdentifierSAN(value)
	if err != nil {
		t.Fatal(err)
	}
	return ext
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func create(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Signer is a CA certificate with its key, for minting certificates that a
// real CA of TP would never issue.
type Signer struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// RootSigner is the root with its key.
func (ca *CA) RootSigner() Signer { return Signer{ca.Root, ca.RootKey} }

// IntermediateSigner is the issuing intermediate with its key.
func (ca *CA) IntermediateSigner() Signer { return Signer{ca.Intermediate, ca.IntermediateKey} }

// NewIntermediate makes another intermediate CA under parent, as a second
// issuing CA under the same root would be.
func NewIntermediate(t testing.TB, parent Signer, cn string) Signer {
	t.Helper()
	key := newKey(t)
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	return Signer{create(t, tmpl, parent.Cert, key.Public(), parent.Key), key}
}

// DeviceCert mints a device certificate for deviceID signed by issuer, shaped
// like ClientCert's; edit, when not nil, changes the template before signing
// (to make it a CA, drop its extended key usage, …). The chain holds the leaf
// and issuer.
func DeviceCert(t testing.TB, issuer Signer, deviceID string, edit func(*x509.Certificate)) tls.Certificate {
	t.Helper()
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:    serial(t),
		Subject:         pkix.Name{CommonName: deviceID},
		NotBefore:       now.Add(-time.Minute),
		NotAfter:        now.Add(4 * time.Hour),
		KeyUsage:        x509.KeyUsageDigitalSignature,
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		ExtraExtensions: []pkix.Extension{PermanentIdentifierSAN(t, deviceID)},
	}
	if edit != nil {
		edit(tmpl)
	}
	key := newKey(t)
	leaf := create(t, tmpl, issuer.Cert, key.Public(), issuer.Key)
	return tls.Certificate{Certificate: [][]byte{leaf.Raw, issuer.Cert.Raw}, PrivateKey: key, Leaf: leaf}
}
