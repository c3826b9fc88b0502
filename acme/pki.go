package acme

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
)

// File names inside the CA directory (DATA/ca).
const (
	rootCertFile   = "root.crt"
	rootKeyFile    = "root.key"
	interCertFile  = "intermediate.crt"
	interKeyFile   = "intermediate.key"
	attestCertFile = "attestation-root.crt"
	attestKeyFile  = "attestation-root.key"
)

// PKI is TP's certificate hierarchy: a root, an intermediate that signs device and
// server certificates, and a separate attestation root that signs the minutes-long
// attestation certificates the enrollment endpoint hands to logged-in devices.
type PKI struct {
	Root            *x509.Certificate
	Intermediate    *x509.Certificate
	IntermediateKey crypto.Signer
	AttestRoot      *x509.Certificate
	AttestKey       crypto.Signer
}

// Fingerprint is the SHA-256 of the root certificate, as "SHA256:<hex>". dlogin pins it.
func (p *PKI) Fingerprint() string { return login.Fingerprint(p.Root) }

// Bootstrap loads the PKI from dir, creating any missing part on first use.
// name is put in the certificates' subjects (the organisation's or server's name).
func Bootstrap(dir, name string) (*PKI, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create CA directory: %w", err)
	}
	_, err := os.Stat(filepath.Join(dir, rootCertFile))
	if errors.Is(err, os.ErrNotExist) {
		if err := create(dir, name); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, err
	}
	return LoadPKI(dir)
}

// LoadPKI reads an existing PKI from dir.
func LoadPKI(dir string) (*PKI, error) {
	var p PKI
	var err error
	if p.Root, err = readCert(filepath.Join(dir, rootCertFile)); err != nil {
		return nil, err
	}
	if p.Intermediate, err = readCert(filepath.Join(dir, interCertFile)); err != nil {
		return nil, err
	}
	if p.IntermediateKey, err = readKey(filepath.Join(dir, interKeyFile)); err != nil {
		return nil, err
	}
	if p.AttestRoot, err = readCert(filepath.Join(dir, attestCertFile)); err != nil {
		return nil, err
	}
	if p.AttestKey, err = readKey(filepath.Join(dir, attestKeyFile)); err != nil {
		return nil, err
	}
	if err := p.Intermediate.CheckSignatureFrom(p.Root); err != nil {
		return nil, fmt.Errorf("%s is not signed by %s in %s: %w", interCertFile, rootCertFile, dir, err)
	}
	return &p, nil
}

func create(dir, name string) error {
	now := time.Now().Add(-time.Minute)
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	root, err := sign(&x509.Certificate{
		Subject:               pkix.Name{CommonName: name + " TP Root CA", Organization: []string{"TP"}},
		NotBefore:             now,
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}, nil, rootKey.Public(), rootKey)
	if err != nil {
		return err
	}
	interKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	inter, err := sign(&x509.Certificate{
		Subject:               pkix.Name{CommonName: name + " TP Intermediate CA", Organization: []string{"TP"}},
		NotBefore:             now,
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}, root, interKey.Public(), rootKey)
	if err != nil {
		return err
	}
	attKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	att, err := sign(&x509.Certificate{
		Subject:               pkix.Name{CommonName: name + " TP Device Attestation Root", Organization: []string{"TP"}},
		NotBefore:             now,
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}, nil, attKey.Public(), attKey)
	if err != nil {
		return err
	}
	// Keys first, certificates last: the root certificate's presence means "complete".
	for _, w := range []struct {
		file string
		key  *ecdsa.PrivateKey
	}{{rootKeyFile, rootKey}, {interKeyFile, interKey}, {attestKeyFile, attKey}} {
		if err := writeKey(filepath.Join(dir, w.file), w.key); err != nil {
			return err
		}
	}
	for _, w := range []struct {
		file string
		cert *x509.Certificate
	}{{attestCertFile, att}, {interCertFile, inter}, {rootCertFile, root}} {
		if err := login.WriteFileAtomic(filepath.Join(dir, w.file), login.PEMCert(w.cert), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// IssueServerCert signs a serverAuth certificate for names (DNS names or IP
// addresses) with the intermediate, valid for lifetime. The chain holds the leaf and
// the intermediate.
func (p *PKI) IssueServerCert(names []string, lifetime time.Duration) (chain [][]byte, key crypto.Signer, leaf *x509.Certificate, err error) {
	if len(names) == 0 {
		return nil, nil, nil, errors.New("server certificate needs at least one name")
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	now := time.Now().Add(-time.Minute)
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: names[0]},
		NotBefore:   now,
		NotAfter:    now.Add(lifetime),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	leaf, err = sign(tmpl, p.Intermediate, k.Public(), p.IntermediateKey)
	if err != nil {
		return nil, nil, nil, err
	}
	return [][]byte{leaf.Raw, p.Intermediate.Raw}, k, leaf, nil
}

// IssueNodeCert signs the node certificate of instance name with the
// intermediate: one URI subjectAltName authz.NodeURIPrefix+name, valid for
// server and client authentication (peer connections are mutual), for
// lifetime. No ACME order can yield such a name (docs/SCALE.md, "Peering").
func (p *PKI) IssueNodeCert(name string, lifetime time.Duration) (chain [][]byte, key crypto.Signer, leaf *x509.Certificate, err error) {
	u, err := url.Parse(authz.NodeURIPrefix + name)
	if err != nil || name == "" {
		return nil, nil, nil, fmt.Errorf("node certificate for %q: not a usable instance name", name)
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	now := time.Now().Add(-time.Minute)
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "tp node " + name},
		NotBefore:   now,
		NotAfter:    now.Add(lifetime),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{u},
	}
	leaf, err = sign(tmpl, p.Intermediate, k.Public(), p.IntermediateKey)
	if err != nil {
		return nil, nil, nil, err
	}
	return [][]byte{leaf.Raw, p.Intermediate.Raw}, k, leaf, nil
}

func sign(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) (*x509.Certificate, error) {
	sn, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = sn
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("sign certificate %q: %w", tmpl.Subject.CommonName, err)
	}
	return x509.ParseCertificate(der)
}

func writeKey(path string, k *ecdsa.PrivateKey) error {
	b, err := login.PEMKey(k)
	if err != nil {
		return err
	}
	return login.WriteFileAtomic(path, b, 0o600)
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA certificate: %w", err)
	}
	certs, err := login.ParseCertsPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs[0], nil
}

func readKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA key: %w", err)
	}
	k, err := login.ParseKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}
