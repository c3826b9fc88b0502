package authz

import (
	"crypto/x509"
	"errors"
	"fmt"
	"time"
)

// Issuer is what a device certificate must come from: TP's issuing intermediate,
// itself signed by TP's root. A chain to the root alone is not enough: the root
// also signs other intermediates (and could sign leaves), and none of those
// speaks for a device.
type Issuer struct {
	Root         *x509.Certificate
	Intermediate *x509.Certificate
}

// VerifyLeaf checks leaf as TP's listeners do, whatever intermediates a peer
// sent along: valid at now, signed by the issuing intermediate (which chains to
// the root), an end-entity certificate (not CA:TRUE) and marked for clientAuth
// explicitly. A certificate without extended key usage is refused: Go's x509
// treats a missing EKU as "any usage", TP does not.
func (is Issuer) VerifyLeaf(leaf *x509.Certificate, now time.Time) error {
	if leaf == nil {
		return errors.New("no client certificate was presented; run dlogin to get one")
	}
	if err := checkEndEntity(leaf); err != nil {
		return err
	}
	if is.Root == nil || is.Intermediate == nil {
		return errors.New("the issuing CA is not configured, so no device certificate can be accepted")
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(is.Root)
	inters.AddCert(is.Intermediate)
	chains, err := leaf.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inters, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		var inv x509.CertificateInvalidError
		if errors.As(err, &inv) && inv.Reason == x509.Expired {
			return fmt.Errorf("client certificate expired at %s; run dlogin for a new one", leaf.NotAfter.UTC().Format(time.RFC3339))
		}
		var ua x509.UnknownAuthorityError
		if errors.As(err, &ua) {
			return is.wrongIssuer(leaf)
		}
		return fmt.Errorf("client certificate %q was not issued by this TP server's CA (%v); run dlogin against this server", leaf.Subject.CommonName, err)
	}
	return is.CheckChains(leaf, chains)
}

// CheckChains accepts leaf when crypto/tls (or x509.Verify) has already
// verified it into chains against the root: one of them must run through the
// issuing intermediate, and the leaf must be an end-entity clientAuth
// certificate. tls.Config.VerifyConnection calls it with
// ConnectionState.VerifiedChains, which resumed sessions carry too.
func (is Issuer) CheckChains(leaf *x509.Certificate, chains [][]*x509.Certificate) error {
	if leaf == nil {
		return errors.New("no client certificate was presented; run dlogin to get one")
	}
	if err := checkEndEntity(leaf); err != nil {
		return err
	}
	if is.Root == nil || is.Intermediate == nil {
		return errors.New("the issuing CA is not configured, so no device certificate can be accepted")
	}
	for _, ch := range chains {
		if len(ch) == 3 && ch[0].Equal(leaf) && ch[1].Equal(is.Intermediate) && ch[2].Equal(is.Root) {
			return nil
		}
	}
	return is.wrongIssuer(leaf)
}

func (is Issuer) wrongIssuer(leaf *x509.Certificate) error {
	issuer := leaf.Issuer.CommonName
	if issuer == "" {
		issuer = leaf.Issuer.String()
	}
	if issuer == is.Intermediate.Subject.CommonName {
		return fmt.Errorf("client certificate %q was issued by another CA named %q, not by this TP server's issuing CA; run dlogin against this server",
			leaf.Subject.CommonName, issuer)
	}
	return fmt.Errorf("client certificate %q was issued by %q, not by this TP server's issuing CA %q; only certificates from dlogin are accepted",
		leaf.Subject.CommonName, issuer, is.Intermediate.Subject.CommonName)
}

// checkEndEntity refuses CA certificates and certificates not marked for
// clientAuth, before any signature is checked.
func checkEndEntity(leaf *x509.Certificate) error {
	if leaf.BasicConstraintsValid && leaf.IsCA {
		return fmt.Errorf("client certificate %q is a CA certificate (basic constraints CA:TRUE); TP accepts only device certificates from dlogin", leaf.Subject.CommonName)
	}
	if !hasClientAuth(leaf) {
		return fmt.Errorf("client certificate %q is not marked for client authentication (no clientAuth extended key usage; a certificate without any is refused too); run dlogin for a device certificate", leaf.Subject.CommonName)
	}
	return nil
}
