package acme

import (
	"crypto/ecdsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/smallstep/certificates/db"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
)

// A browser's credential (TP.js, docs/LOGIN.md "Browsers"): a grant to
// connect (scope dial:NAME) whose key is a WebCrypto key that never leaves
// the browser. ACME and its attestation are more than a page should carry,
// so the browser asks login.PathGrantCertificate, signed by the granted key,
// and gets a device certificate for that key, as long-lived as any device's.

// grantCertificate issues a device certificate for a granted key that may
// only connect.
func (e *Enroller) grantCertificate(w http.ResponseWriter, r *http.Request) {
	dev, pub, ok := e.grantedKey(w, r, login.GrantCertificateMessage)
	if !ok {
		return
	}
	sc := e.Users.Scope(dev.ID)
	if !strings.HasPrefix(string(sc), "dial:") {
		writeErr(w, http.StatusForbidden, fmt.Sprintf("%s (scope %q) logs in as any device does, with ACME (tp login); this endpoint serves credentials that may only connect (dial:NAME), a browser's", dev.ID, sc))
		return
	}
	// A credential bound to an origin is served to that origin's pages only:
	// a browser names the page's origin itself, and no page can say another.
	if o := sc.Origin(); o != "" && r.Header.Get("Origin") != o {
		writeErr(w, http.StatusForbidden, fmt.Sprintf("%s may be used from pages of %s only, and this request comes from %q", dev.ID, o, r.Header.Get("Origin")))
		return
	}
	if !e.checkBindingRate(w, dev) { // each certificate is a row of the CA's database
		return
	}
	chain, leaf, err := e.CA.issueKeyCertificate(dev.ID, pub, e.now())
	if err != nil {
		e.log().Error("grant certificate failed", "device", dev.ID, "err", err)
		writeErr(w, http.StatusForbidden, err.Error())
		return
	}
	if err := e.Users.TouchLogin(dev.ID); err != nil {
		e.log().Warn("recording a grant's login failed", "device", dev.ID, "err", err)
	}
	e.log().Info("grant certificate issued", "device", dev.ID, "serial", leaf.SerialNumber.Text(16), "not_after", leaf.NotAfter.UTC().Format(time.RFC3339), "remote", r.RemoteAddr)
	out := login.GrantCertificateResponse{DeviceID: dev.ID, Scope: string(e.Users.Scope(dev.ID)), NotAfter: leaf.NotAfter.UTC().Format(time.RFC3339)}
	for _, c := range chain {
		out.Chain = append(out.Chain, base64.StdEncoding.EncodeToString(c))
	}
	writeJSON(w, http.StatusOK, out)
}

// allowAnyOrigin lets a page of any site read the answer: the request is
// authorised by a signature of a key the page holds, never by a cookie.
func allowAnyOrigin(w http.ResponseWriter) {
	w.Header().Set("Access-Control-Allow-Origin", "*")
}

// corsPreflight answers a browser's preflight of a POST of JSON to the
// endpoints TP.js calls from pages of any site.
func corsPreflight(w http.ResponseWriter, _ *http.Request) {
	allowAnyOrigin(w)
	w.Header().Set("Access-Control-Allow-Methods", "POST")
	w.Header().Set("Access-Control-Allow-Headers", "Content-Type")
	w.Header().Set("Access-Control-Max-Age", "3600")
	w.WriteHeader(http.StatusNoContent)
}

// issueKeyCertificate signs a device certificate of deviceID for pub with
// the issuing intermediate: the identity in a permanentIdentifier, clientAuth,
// as long as the CA's device certificates and never past the device's end (a
// guest's share: SetDeviceEnds). The CA's database records it, so that tpd
// revoke --serial finds it.
func (c *CA) issueKeyCertificate(deviceID string, pub *ecdsa.PublicKey, now time.Time) ([][]byte, *x509.Certificate, error) {
	san, err := authz.PermanentIdentifierSAN(deviceID)
	if err != nil {
		return nil, nil, err
	}
	notAfter := now.Add(c.life)
	if fn := c.deviceEnds.Load(); fn != nil {
		if end := (*fn)(deviceID); !end.IsZero() && end.Before(notAfter) {
			if !end.After(now.Add(time.Minute)) {
				return nil, nil, fmt.Errorf("device %s may no longer connect (its share ended at %s)", deviceID, end.UTC().Format(time.RFC3339))
			}
			notAfter = end
		}
	}
	tmpl := &x509.Certificate{
		Subject:         pkix.Name{CommonName: deviceID},
		NotBefore:       now.Add(-time.Minute),
		NotAfter:        notAfter,
		KeyUsage:        x509.KeyUsageDigitalSignature,
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		ExtraExtensions: []pkix.Extension{san},
	}
	leaf, err := sign(tmpl, c.pki.Intermediate, pub, c.pki.IntermediateKey)
	if err != nil {
		return nil, nil, err
	}
	if st, ok := c.auth.GetDatabase().(db.CertificateStorer); ok {
		if err := st.StoreCertificate(leaf); err != nil {
			return nil, nil, errors.New("the CA cannot record the certificate right now; try again in a minute")
		}
	}
	return [][]byte{leaf.Raw, c.pki.Intermediate.Raw}, leaf, nil
}
