package login

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"time"
)

// Enrollment endpoints, on tpd's HTTPS server next to the ACME API.
const (
	PathRoots  = "/tp/v1/roots"
	PathEnroll = "/tp/v1/enroll"
	PathAttest = "/tp/v1/attest"
	PathWhoami = "/tp/v1/whoami"
	// PathSSO says whether and how people sign in with the organisation's
	// OpenID Connect provider (GET, SSOInfo); PathEnrollSSO registers a
	// device key with the ID token of such a sign-in (POST, EnrollSSORequest).
	PathSSO       = "/tp/v1/sso"
	PathEnrollSSO = "/tp/v1/enroll/sso"
)

// Signing contexts keep a device signature for one purpose from being replayed for another.
const (
	enrollContext = "tp-enroll-v1"
	attestContext = "tp-attest-v1"
	whoamiContext = "tp-whoami-v1"
	ssoContext    = "tp-enroll-sso-v1"
)

// EnrollRequest registers a device key with a one-time token.
type EnrollRequest struct {
	Token     string `json:"token"`
	PublicKey string `json:"public_key"` // base64 PKIX DER of the device key (ECDSA P-256)
	Signature string `json:"signature"`  // base64 ASN.1 ECDSA over SHA-256(EnrollMessage)
}

// EnrollResponse says which device the key now belongs to.
type EnrollResponse struct {
	DeviceID string `json:"device_id"`
	User     string `json:"user"`
	Device   string `json:"device"`
}

// SSOInfo is what a device needs to sign a person in with the server's
// OpenID Connect provider: the issuer (its discovery document is at
// Issuer + "/.well-known/openid-configuration"), the client TP is registered
// as there (a public client: no secret), and the scopes to ask for.
type SSOInfo struct {
	Issuer   string   `json:"issuer"`
	ClientID string   `json:"client_id"`
	Scopes   []string `json:"scopes"`
	// Renew is RenewSignIn when the device's renewals need a fresh sign-in
	// (CodeSignIn), "" when its key renews it. KeepRefresh says the device
	// may keep the provider's refresh token for them (it asks for
	// offline_access); without it, each renewal signs the person in again.
	Renew       string `json:"renew,omitempty"`
	KeepRefresh bool   `json:"keep_refresh,omitempty"`
}

// EnrollSSORequest registers a device key for the person an ID token names.
type EnrollSSORequest struct {
	IDToken   string `json:"id_token"`   // the provider's ID token, issued to SSOInfo.ClientID
	Device    string `json:"device"`     // the device's name, e.g. laptop
	PublicKey string `json:"public_key"` // base64 PKIX DER of the device key (ECDSA P-256)
	Signature string `json:"signature"`  // base64 ASN.1 ECDSA over SHA-256(EnrollSSOMessage)
	// Share, for a guest (a person outside the server's sso-domain), picks
	// the shared name to enrol for when several are shared with them;
	// empty takes the only one.
	Share string `json:"share,omitempty"`
}

// EnrollSSOResponse is EnrollResponse with the groups the provider's claims
// gave the user, and the groups left out because they are not valid TP
// names.
type EnrollSSOResponse struct {
	EnrollResponse
	Groups  []string `json:"groups"`
	Ignored []string `json:"ignored_groups,omitempty"`
	// Guest is set for a guest's device: the name it may connect to, and
	// when its share ends.
	Guest *GuestInfo `json:"guest,omitempty"`
}

// GuestInfo is what a guest's device may do, and until when.
type GuestInfo struct {
	Name  string    `json:"name"` // the reverse name's label
	Host  string    `json:"host"` // the name to connect to (NAME.<reverse zone>)
	Share string    `json:"share"`
	By    string    `json:"by"` // the user who shared it
	Until time.Time `json:"until"`
}

// AttestRequest asks for an attestation certificate for a fresh login key.
type AttestRequest struct {
	DeviceID  string `json:"device_id"`
	PublicKey string `json:"public_key"` // base64 PKIX DER of the fresh key (ECDSA P-256)
	Time      string `json:"time"`       // RFC 3339, within 5 minutes of the server's clock
	Signature string `json:"signature"`  // device key's base64 ASN.1 ECDSA over SHA-256(AttestMessage)
	// IDToken is a fresh ID token of the person who enrolled the device by
	// single sign-on, when the server asks for one (CodeSignIn).
	IDToken string `json:"id_token,omitempty"`
}

// AttestResponse carries what the device needs for one ACME device-attest-01 order.
type AttestResponse struct {
	Certificate string `json:"certificate"`  // base64 DER attestation certificate for the fresh key
	EABKeyID    string `json:"eab_key_id"`   // single-use external account binding
	EABHMACKey  string `json:"eab_hmac_key"` // base64url, no padding
	Directory   string `json:"directory"`    // ACME directory path on this server
}

// ErrorResponse is the body of every non-2xx enrollment answer.
type ErrorResponse struct {
	Error string `json:"error"`
	// Code, when set, tells a program what to do: CodeSignIn.
	Code string `json:"code,omitempty"`
}

// CodeSignIn answers a login (PathAttest) of a device enrolled by single
// sign-on on a server whose renewals need a fresh sign-in (SSOInfo.Renew):
// sign the person in at the provider and send the ID token with the request
// (AttestRequest.IDToken).
const CodeSignIn = "sign_in_required"

// RenewSignIn is SSOInfo.Renew on a server where a device enrolled by single
// sign-on renews only with a fresh sign-in at the provider.
const RenewSignIn = "sign-in"

// EnrollMessage is what the device key signs to redeem a token.
func EnrollMessage(token, publicKeyB64 string) []byte {
	return []byte(enrollContext + "\x00" + token + "\x00" + publicKeyB64)
}

// EnrollSSOMessage is what the device key signs to enrol with an ID token:
// the token, the device's name and the key, so that neither can be swapped.
func EnrollSSOMessage(idToken, device, publicKeyB64 string) []byte {
	return []byte(ssoContext + "\x00" + idToken + "\x00" + device + "\x00" + publicKeyB64)
}

// AttestMessage is what the device key signs to get a login key attested.
func AttestMessage(deviceID, publicKeyB64, ts string) []byte {
	return []byte(attestContext + "\x00" + deviceID + "\x00" + publicKeyB64 + "\x00" + ts)
}

// SignMessage signs msg the way the enrollment endpoints verify it.
func SignMessage(key crypto.Signer, msg []byte) (string, error) {
	sum := sha256.Sum256(msg)
	sig, err := key.Sign(rand.Reader, sum[:], crypto.SHA256)
	if err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(sig), nil
}

// WhoamiRequest asks the server what it knows about this device, signed by the
// device key so that nobody else can read a device's groups.
type WhoamiRequest struct {
	DeviceID  string `json:"device_id"`
	Time      string `json:"time"`      // RFC 3339, within 5 minutes of the server's clock
	Signature string `json:"signature"` // device key's base64 ASN.1 ECDSA over SHA-256(WhoamiMessage)
	// Certificate, when present, is the device's current certificate (base64
	// DER, leaf first; at most MaxWhoamiChain entries): the server answers
	// whether its proxy would accept it now. Certificates are public, so it is
	// not covered by the signature.
	Certificate []string `json:"certificate,omitempty"`
	// SignedBy names the key behind Signature: "" or SignedByDevice for the
	// device key, SignedByCertificate for the key of Certificate's leaf, which
	// must be a certificate TP's CA issued to DeviceID (it may be expired or
	// revoked: that is what a device without its device key asks about).
	SignedBy string `json:"signed_by,omitempty"`
}

// WhoamiRequest.SignedBy values.
const (
	SignedByDevice      = "device"
	SignedByCertificate = "certificate"
)

// MaxWhoamiChain bounds WhoamiRequest.Certificate.
const MaxWhoamiChain = 4

// WhoamiResponse is the server's view of the device.
type WhoamiResponse struct {
	DeviceID  string    `json:"device_id"`
	User      string    `json:"user"`
	Device    string    `json:"device"`
	Groups    []string  `json:"groups"`
	Revoked   bool      `json:"revoked"`
	LastLogin time.Time `json:"last_login,omitzero"`
	// Scope narrows what the device may do whatever the policy allows
	// ("expose:ci": only keep ci exposed); absent for a device without one.
	Scope string `json:"scope,omitempty"`
	// GrantedBy is the device that approved this one's grant; absent for a
	// device not granted.
	GrantedBy string `json:"granted_by,omitempty"`
	// Certificate answers WhoamiRequest.Certificate; absent when none was sent.
	Certificate *CertificateStatus `json:"certificate,omitempty"`
}

// CertificateStatus is the server's verdict on a device certificate: the same
// check its TLS and QUIC listeners make (issuer, validity, deny list, device).
type CertificateStatus struct {
	Serial   string `json:"serial"`           // hex, as tp whoami and tpd revoke --serial print it
	Accepted bool   `json:"accepted"`         // a connection with it would be accepted now
	Reason   string `json:"reason,omitempty"` // why not, for a person
}

// WhoamiMessage is what the device key signs to ask about itself.
func WhoamiMessage(deviceID, ts string) []byte {
	return []byte(whoamiContext + "\x00" + deviceID + "\x00" + ts)
}

// PathReverseChallenge publishes a dns-01 answer for a reverse name the device holds.
const PathReverseChallenge = "/tp/v1/reverse-challenge"

const reverseContext = "tp-reverse-challenge-v1"

// ReverseChallengeRequest asks the CA to accept Value as the dns-01 answer for
// Name, a reverse name this device holds.
type ReverseChallengeRequest struct {
	DeviceID  string `json:"device_id"`
	Name      string `json:"name"`
	Value     string `json:"value"`
	Time      string `json:"time"`
	Signature string `json:"signature"` // device key over ReverseChallengeMessage
}

// ReverseChallengeMessage is what the device key signs to publish a dns-01 answer.
func ReverseChallengeMessage(deviceID, name, value, ts string) []byte {
	return []byte(reverseContext + "\x00" + deviceID + "\x00" + name + "\x00" + value + "\x00" + ts)
}

// PathReverseAccount hands the owner of a reverse name a single-use ACME account
// binding for the reverse-name provisioner, which accepts no account without one.
const PathReverseAccount = "/tp/v1/reverse-account"

const reverseAccountContext = "tp-reverse-account-v1"

// ReverseAccountRequest asks for an account binding to get a certificate for Name.
type ReverseAccountRequest struct {
	DeviceID  string `json:"device_id"`
	Name      string `json:"name"`
	Time      string `json:"time"`
	Signature string `json:"signature"` // device key over ReverseAccountMessage
}

// ReverseAccountResponse is a single-use external account binding.
type ReverseAccountResponse struct {
	EABKeyID   string `json:"eab_key_id"`
	EABHMACKey string `json:"eab_hmac_key"` // base64url, no padding
}

// ReverseAccountMessage is what the device key signs to get the binding.
func ReverseAccountMessage(deviceID, name, ts string) []byte {
	return []byte(reverseAccountContext + "\x00" + deviceID + "\x00" + name + "\x00" + ts)
}
