package acme

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/big"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

const (
	maxBody = 16 << 10
	// AttestationLifetime is how long an attestation certificate is valid: long
	// enough for one ACME order, short enough to be useless afterwards.
	AttestationLifetime = 10 * time.Minute
	// maxClockSkew bounds how far a device's signed timestamp may be from ours.
	maxClockSkew = 5 * time.Minute
)

// oidStepManagedDevice is the extension step-ca reads the attested device ID from
// (format "step"): an ASN.1 SEQUENCE holding the device ID string.
var oidStepManagedDevice = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 37476, 9000, 64, 4}

// Enroller serves the enrollment endpoints.
type Enroller struct {
	PKI    *PKI
	CA     *CA
	Users  users.Store
	Logger *slog.Logger
	Now    func() time.Time
	// ReverseOwner says which device holds a reverse name (reverse.go); nil
	// refuses every reverse-name certificate.
	ReverseOwner func(host string) (deviceID string, ok bool)
	// Denied consults tpd's deny list (device, user); a denied device gets no
	// attestation, account binding or certificate. nil denies nothing.
	Denied func(dev users.Device) (reason string, denied bool)
	// CheckCertificate is the proxy listeners' own check of a device
	// certificate; whoami answers with it. nil: whoami reports every
	// certificate as not accepted (it cannot tell).
	CheckCertificate func(leaf *x509.Certificate) error
	// AllowBinding limits the ACME account bindings (EAB keys) a device mints,
	// one per login and per reverse-name certificate: each is a database record
	// until pruned. Refused, the device is told to wait. nil allows all.
	AllowBinding func(deviceID string) (ok bool, wait time.Duration)
	// Enrolled, when set, is told of each device that redeemed its token or
	// enrolled by single sign-on (the audit trail); remote is the device's
	// address, via how it enrolled.
	Enrolled func(dev users.Device, remote, via string)
	// SSO, when set, lets people enrol a device by signing in with the
	// organisation's OpenID Connect provider (sso.go).
	SSO *SSO
	// MayExpose, when set, lets people grant an application a credential
	// that keeps one reverse name exposed (grant.go): it says whether the
	// policy lets the approving device keep the name exposed itself. nil
	// refuses every grant.
	MayExpose MayExposeFunc
	// MaxGrants bounds a user's grants not revoked (DefaultMaxGrants when zero).
	MaxGrants int
	// GrantRevoked, when set, is told of each grant its person revoked
	// (grant.go): tpd audits it and ends the grant's sessions at once.
	GrantRevoked func(grant users.Device, by, remote string)
	// MayShare, when set, lets people share a reverse name with a guest
	// (share.go): it says whether the policy lets the sharing device keep
	// the name exposed itself. nil refuses every share.
	MayShare MayExposeFunc
	// ReverseZone is the zone reverse names live under (rev.tp.internal):
	// a share tells its guest the full name.
	ReverseZone string
	// MaxShares bounds a user's shares that have not ended
	// (users.DefaultMaxShares when zero).
	MaxShares int
	// Shared and ShareRevoked, when set, are told of each share made, and
	// each its person revoked (share.go): tpd audits them, and ends a
	// revoked share's sessions at once.
	Shared       func(sh users.Share, remote string)
	ShareRevoked func(sh users.Share, by, remote string)
	// URL is the server's public base URL (https://HOST[:PORT]): with SSO,
	// people approve grants on its website by signing in (grantweb.go), and
	// the provider sends them back to it.
	URL string

	web webGrants // approvals under way on the website (grantweb.go)
}

// Handler serves login.PathRoots, login.PathEnroll and login.PathAttest.
func (e *Enroller) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+login.PathRoots, e.roots)
	mux.HandleFunc("POST "+login.PathEnroll, e.enroll)
	mux.HandleFunc("POST "+login.PathAttest, e.attest)
	mux.HandleFunc("POST "+login.PathWhoami, e.whoami)
	mux.HandleFunc("GET "+login.PathSSO, e.sso)
	mux.HandleFunc("POST "+login.PathEnrollSSO, e.enrollSSO)
	mux.HandleFunc("POST "+login.PathReverseChallenge, e.reverseChallenge)
	mux.HandleFunc("POST "+login.PathReverseAccount, e.reverseAccount)
	mux.HandleFunc("POST "+login.PathGrant, e.grant)
	mux.HandleFunc("POST "+login.PathGrantStatus, e.grantStatus)
	mux.HandleFunc("OPTIONS "+login.PathGrantStatus, corsPreflight)
	mux.HandleFunc("POST "+login.PathGrantCertificate, e.grantCertificate)
	mux.HandleFunc("OPTIONS "+login.PathGrantCertificate, corsPreflight)
	mux.HandleFunc("POST "+login.PathGrants, e.grants)
	mux.HandleFunc("POST "+login.PathGrantRevoke, e.grantRevoke)
	mux.HandleFunc("POST "+login.PathShare, e.share)
	mux.HandleFunc("POST "+login.PathShares, e.shares)
	mux.HandleFunc("POST "+login.PathShareRevoke, e.shareRevoke)
	return mux
}

func (e *Enroller) now() time.Time {
	if e.Now != nil {
		return e.Now()
	}
	return time.Now()
}

func (e *Enroller) log() *slog.Logger {
	if e.Logger != nil {
		return e.Logger
	}
	return slog.New(slog.DiscardHandler)
}

func (e *Enroller) roots(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/x-pem-file")
	w.Write(login.PEMCert(e.PKI.Root))
}

func (e *Enroller) enroll(w http.ResponseWriter, r *http.Request) {
	var req login.EnrollRequest
	if !decode(w, r, &req) {
		return
	}
	pub, err := parseP256(req.PublicKey)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "device public_key: "+err.Error())
		return
	}
	if !verify(pub, login.EnrollMessage(req.Token, req.PublicKey), req.Signature) {
		writeErr(w, http.StatusBadRequest, "signature does not match the device public key")
		return
	}
	der, _ := base64.StdEncoding.DecodeString(req.PublicKey)
	dev, err := e.Users.Redeem(req.Token, der)
	if err != nil {
		if errors.Is(err, users.ErrBadToken) {
			e.log().Warn("enrollment refused", "remote", r.RemoteAddr, "why", "bad token")
			writeErr(w, http.StatusUnauthorized, err.Error())
			return
		}
		if errors.Is(err, users.ErrUnavailable) {
			e.unavailable(w, "enrollment", err, "so the token was not used; run the same dlogin command again in a minute")
			return
		}
		e.log().Error("enrollment failed", "err", err)
		writeErr(w, http.StatusInternalServerError, "enrollment failed on the server; try again or ask your administrator to check tpd's log")
		return
	}
	e.log().Info("device enrolled", "device", dev.ID, "remote", r.RemoteAddr)
	if e.Enrolled != nil {
		e.Enrolled(dev, r.RemoteAddr, "enrollment token")
	}
	writeJSON(w, http.StatusOK, login.EnrollResponse{DeviceID: dev.ID, User: dev.User, Device: dev.Name})
}

// checkActive refuses (and returns false) a device that is revoked, disabled or
// on tpd's deny list: it gets no attestation, binding or certificate.
func (e *Enroller) checkActive(w http.ResponseWriter, dev users.Device) bool {
	if dev.Revoked {
		writeErr(w, http.StatusForbidden, fmt.Sprintf("device %q has been revoked; ask your administrator to enroll it again", dev.ID))
		return false
	}
	if _, err := e.Users.Lookup(dev.ID); err != nil {
		writeErr(w, http.StatusForbidden, err.Error())
		return false
	}
	if e.Denied != nil {
		if reason, denied := e.Denied(dev); denied {
			writeErr(w, http.StatusForbidden, reason)
			return false
		}
	}
	return true
}

// checkBindingRate refuses (and returns false) a device that minted too many
// account bindings lately, saying when to retry.
func (e *Enroller) checkBindingRate(w http.ResponseWriter, dev users.Device) bool {
	if e.AllowBinding == nil {
		return true
	}
	ok, wait := e.AllowBinding(dev.ID)
	if ok {
		return true
	}
	secs := int(math.Ceil(wait.Seconds()))
	e.log().Warn("account binding refused", "device", dev.ID, "why", "rate limit", "retry_after_s", secs)
	w.Header().Set("Retry-After", strconv.Itoa(secs))
	writeErr(w, http.StatusTooManyRequests, fmt.Sprintf("device %q asked for too many certificates in a short time; try again in %d s", dev.ID, secs))
	return false
}

// errNotThisDevice is the one answer for an unknown device and for a request
// signed by another key, so that nobody can learn which device IDs exist.
func errNotThisDevice(deviceID string) string {
	return fmt.Sprintf("%q is not a device enrolled with this key; if this device was never enrolled or its key was lost, ask your administrator for a token (tpd enroll) and run dlogin --token", deviceID)
}

// checkDevice verifies a request signed by an enrolled device's key with a fresh
// timestamp. It writes the refusal and returns false when the request is not.
func (e *Enroller) checkDevice(w http.ResponseWriter, r *http.Request, deviceID, ts, sig string, msg []byte) (users.Device, bool) {
	dev, err := e.Users.Device(deviceID)
	if err != nil || len(dev.PublicKey) == 0 {
		writeErr(w, http.StatusForbidden, errNotThisDevice(deviceID))
		return dev, false
	}
	devKey, err := x509.ParsePKIXPublicKey(dev.PublicKey)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, "stored device key is unreadable; ask your administrator to enroll the device again")
		return dev, false
	}
	devPub, ok := devKey.(*ecdsa.PublicKey)
	if !ok {
		writeErr(w, http.StatusInternalServerError, "stored device key has an unsupported type")
		return dev, false
	}
	if !verify(devPub, msg, sig) {
		e.log().Warn("device request refused", "device", deviceID, "path", r.URL.Path, "remote", r.RemoteAddr, "why", "bad signature")
		writeErr(w, http.StatusForbidden, errNotThisDevice(deviceID))
		return dev, false
	}
	t, err := time.Parse(time.RFC3339, ts)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "time must be RFC 3339")
		return dev, false
	}
	if d := e.now().Sub(t); d > maxClockSkew || d < -maxClockSkew {
		writeErr(w, http.StatusBadRequest, fmt.Sprintf("device clock is off by %s; set the clock (NTP) and retry", d.Round(time.Second)))
		return dev, false
	}
	return dev, true
}

func (e *Enroller) whoami(w http.ResponseWriter, r *http.Request) {
	var req login.WhoamiRequest
	if !decode(w, r, &req) {
		return
	}
	if len(req.Certificate) > login.MaxWhoamiChain {
		writeErr(w, http.StatusBadRequest, fmt.Sprintf("certificate holds %d entries; send at most %d (the leaf first)", len(req.Certificate), login.MaxWhoamiChain))
		return
	}
	var dev users.Device
	var ok bool
	switch req.SignedBy {
	case "", login.SignedByDevice:
		dev, ok = e.checkDevice(w, r, req.DeviceID, req.Time, req.Signature, login.WhoamiMessage(req.DeviceID, req.Time))
	case login.SignedByCertificate:
		dev, ok = e.checkCertificateHolder(w, r, req)
	default:
		writeErr(w, http.StatusBadRequest, fmt.Sprintf("signed_by %q must be %q or %q", req.SignedBy, login.SignedByDevice, login.SignedByCertificate))
		return
	}
	if !ok {
		return
	}
	groups, err := e.Users.Lookup(dev.ID)
	if groups == nil {
		groups = []string{}
	}
	if e.Denied != nil {
		if _, denied := e.Denied(dev); denied && err == nil {
			err = authz.ErrRevoked
		}
	}
	res := login.WhoamiResponse{
		DeviceID: dev.ID, User: dev.User, Device: dev.Name, Groups: groups,
		Revoked: err != nil, LastLogin: dev.LastLogin, Scope: string(dev.Scope), GrantedBy: dev.GrantedBy,
	}
	if len(req.Certificate) > 0 {
		st := e.certificateStatus(dev, req.Certificate)
		res.Certificate = &st
	}
	writeJSON(w, http.StatusOK, res)
}

// checkCertificateHolder verifies a whoami signed by the key of the certificate
// it carries: a certificate TP's issuing intermediate signed for this device
// (valid at some time: expired and revoked ones prove who asks just as well),
// and a fresh timestamp. It writes the refusal and returns false otherwise.
func (e *Enroller) checkCertificateHolder(w http.ResponseWriter, r *http.Request, req login.WhoamiRequest) (users.Device, bool) {
	if len(req.Certificate) == 0 {
		writeErr(w, http.StatusBadRequest, "signed_by certificate needs the certificate")
		return users.Device{}, false
	}
	der, err := base64.StdEncoding.DecodeString(req.Certificate[0])
	if err != nil {
		writeErr(w, http.StatusBadRequest, "the certificate sent is not base64")
		return users.Device{}, false
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "the certificate sent cannot be parsed: "+err.Error())
		return users.Device{}, false
	}
	is := authz.Issuer{Root: e.PKI.Root, Intermediate: e.PKI.Intermediate}
	mid := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
	id, idErr := authz.IdentityFromCert(leaf)
	pub, isECDSA := leaf.PublicKey.(*ecdsa.PublicKey)
	if is.VerifyLeaf(leaf, mid) != nil || idErr != nil || id.DeviceID != req.DeviceID || !isECDSA ||
		!verify(pub, login.WhoamiMessage(req.DeviceID, req.Time), req.Signature) {
		e.log().Warn("device request refused", "device", req.DeviceID, "path", r.URL.Path, "remote", r.RemoteAddr, "why", "bad certificate signature")
		writeErr(w, http.StatusForbidden, errNotThisDevice(req.DeviceID))
		return users.Device{}, false
	}
	dev, err := e.Users.Device(req.DeviceID)
	if err != nil {
		writeErr(w, http.StatusForbidden, errNotThisDevice(req.DeviceID))
		return dev, false
	}
	t, err := time.Parse(time.RFC3339, req.Time)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "time must be RFC 3339")
		return dev, false
	}
	if d := e.now().Sub(t); d > maxClockSkew || d < -maxClockSkew {
		writeErr(w, http.StatusBadRequest, fmt.Sprintf("device clock is off by %s; set the clock (NTP) and retry", d.Round(time.Second)))
		return dev, false
	}
	return dev, true
}

// certificateStatus says whether the proxy would accept the device's
// certificate, by the listeners' own check; only the leaf counts (tpd pins its
// issuing intermediate rather than trusting one sent along).
func (e *Enroller) certificateStatus(dev users.Device, chain []string) login.CertificateStatus {
	der, err := base64.StdEncoding.DecodeString(chain[0])
	if err != nil {
		return login.CertificateStatus{Reason: "the certificate sent is not base64"}
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return login.CertificateStatus{Reason: "the certificate sent cannot be parsed: " + err.Error()}
	}
	st := login.CertificateStatus{Serial: leaf.SerialNumber.Text(16)}
	switch id, err := authz.IdentityFromCert(leaf); {
	case err != nil:
		st.Reason = err.Error()
	case id.DeviceID != dev.ID:
		st.Reason = fmt.Sprintf("the certificate is for %s, not for %s", id.DeviceID, dev.ID)
	case e.CheckCertificate == nil:
		st.Reason = "this server cannot check certificates here"
	default:
		if err := e.CheckCertificate(leaf); err != nil {
			st.Reason = err.Error()
		} else {
			st.Accepted = true
		}
	}
	return st
}

func (e *Enroller) attest(w http.ResponseWriter, r *http.Request) {
	var req login.AttestRequest
	if !decode(w, r, &req) {
		return
	}
	dev, ok := e.checkDevice(w, r, req.DeviceID, req.Time, req.Signature, login.AttestMessage(req.DeviceID, req.PublicKey, req.Time))
	if !ok {
		return
	}
	if !e.checkActive(w, dev) {
		return
	}
	if !e.checkSignIn(w, r, dev, req.IDToken) {
		return
	}
	loginPub, err := parseP256(req.PublicKey)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "public_key: "+err.Error())
		return
	}
	if !e.checkBindingRate(w, dev) {
		return
	}
	cert, err := e.issueAttestation(dev.ID, loginPub)
	if err != nil {
		e.log().Error("attestation failed", "device", dev.ID, "err", err)
		writeErr(w, http.StatusInternalServerError, "could not issue the attestation certificate; see tpd's log")
		return
	}
	kid, hmacKey, err := e.CA.NewEAB(r.Context())
	if err != nil {
		e.log().Error("attestation failed", "device", dev.ID, "err", err)
		writeErr(w, http.StatusInternalServerError, "could not create an ACME account binding; see tpd's log")
		return
	}
	if err := e.Users.TouchLogin(dev.ID); err != nil {
		e.log().Warn("could not record login", "device", dev.ID, "err", err)
	}
	writeJSON(w, http.StatusOK, login.AttestResponse{
		Certificate: base64.StdEncoding.EncodeToString(cert.Raw),
		EABKeyID:    kid,
		EABHMACKey:  base64.RawURLEncoding.EncodeToString(hmacKey),
		Directory:   DirectoryPath(),
	})
}

// issueAttestation signs a short certificate for pub carrying deviceID in the step
// managed-device extension; step-ca's device-attest-01 "step" format checks it
// against the attestation root and compares the key with the order's CSR.
func (e *Enroller) issueAttestation(deviceID string, pub *ecdsa.PublicKey) (*x509.Certificate, error) {
	ext, err := asn1.Marshal(struct{ DeviceID string }{deviceID})
	if err != nil {
		return nil, err
	}
	now := e.now().Add(-time.Minute)
	return sign(&x509.Certificate{
		Subject:         pkix.Name{CommonName: deviceID},
		NotBefore:       now,
		NotAfter:        now.Add(AttestationLifetime),
		KeyUsage:        x509.KeyUsageDigitalSignature,
		ExtraExtensions: []pkix.Extension{{Id: oidStepManagedDevice, Value: ext}},
	}, e.PKI.AttestRoot, pub, e.PKI.AttestKey)
}

func parseP256(b64 string) (*ecdsa.PublicKey, error) {
	der, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, errors.New("not base64")
	}
	k, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, errors.New("not a PKIX public key")
	}
	pub, ok := k.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, errors.New("must be an ECDSA P-256 key")
	}
	return pub, nil
}

func verify(pub *ecdsa.PublicKey, msg []byte, sigB64 string) bool {
	sig, err := base64.StdEncoding.DecodeString(sigB64)
	if err != nil {
		return false
	}
	sum := sha256.Sum256(msg)
	if len(sig) == 64 { // r||s, as WebCrypto signs
		r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
		return ecdsa.Verify(pub, sum[:], r, s)
	}
	return ecdsa.VerifyASN1(pub, sum[:], sig)
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		writeErr(w, http.StatusUnsupportedMediaType, "Content-Type must be application/json")
		return false
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if tooBig := (*http.MaxBytesError)(nil); errors.As(err, &tooBig) {
			writeErr(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body is larger than %d KiB; TP's enrollment requests are under 2 KiB", maxBody>>10))
			return false
		}
		writeErr(w, http.StatusBadRequest, "request body is not the expected JSON: "+err.Error())
		return false
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		writeErr(w, http.StatusBadRequest, "request body has data after the JSON object")
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, login.ErrorResponse{Error: msg})
}

// unavailable answers 503 to a request (what, for the log) that the user
// store could not serve, with when to try again (retry, after "the server
// cannot reach its database right now, ").
func (e *Enroller) unavailable(w http.ResponseWriter, what string, err error, retry string) {
	e.log().Error(what+" failed: the user store is unavailable", "err", err)
	w.Header().Set("Retry-After", "30")
	writeErr(w, http.StatusServiceUnavailable, "the server cannot reach its database right now, "+retry)
}
