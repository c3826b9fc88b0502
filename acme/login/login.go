package login

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/mholt/acmez/v3"
	acmeproto "github.com/mholt/acmez/v3/acme"

	"github.com/tp-proxy/tp/authz"
)

// maxResponse bounds every enrollment/ACME response body a client reads.
const maxResponse = 1 << 20

// FetchRoot downloads TP's root certificate from serverURL without trusting
// anything yet, and accepts it only if its SHA-256 equals fingerprint and the very
// TLS connection that delivered it was made with a certificate chaining to it.
// This is the one place TP talks TLS before it has a root to verify against.
func FetchRoot(ctx context.Context, serverURL, fingerprint string) (*x509.Certificate, error) {
	want, err := NormalizeFingerprint(fingerprint)
	if err != nil {
		return nil, err
	}
	var peer []*x509.Certificate
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{
			MinVersion: tls.VersionTLS12,
			NextProtos: []string{"http/1.1"},
			// Verification happens below, against the pinned root, once we have it.
			InsecureSkipVerify: true,
			VerifyConnection: func(cs tls.ConnectionState) error {
				peer = cs.PeerCertificates
				return nil
			},
		},
		DialContext:       dialChecked,
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	body, err := get(ctx, &http.Client{Transport: tr, Timeout: 30 * time.Second}, serverURL+PathRoots)
	if err != nil {
		return nil, err
	}
	certs, err := ParseCertsPEM(body)
	if err != nil {
		return nil, fmt.Errorf("server at %s did not send a root certificate: %w", serverURL, err)
	}
	root := certs[0]
	if got := Fingerprint(root); got != want {
		return nil, fmt.Errorf("the server's root certificate has fingerprint %s, not %s: refusing it (wrong server, or someone in between); check the fingerprint tpd printed", got, want)
	}
	if len(peer) == 0 {
		return nil, errors.New("server presented no TLS certificate")
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	inter := x509.NewCertPool()
	for _, c := range peer[1:] {
		inter.AddCert(c)
	}
	if _, err := peer[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter}); err != nil {
		return nil, fmt.Errorf("server's TLS certificate does not chain to the pinned root: %w", err)
	}
	return root, nil
}

// pollInterval is how long the ACME client waits before it asks whether an
// authorization is valid, and between asks. TP's CA validates device-attest-01
// and the reverse names' dns-01 (its own TXT records) while it answers the
// challenge, so the first ask finds it valid: acmez's default first wait
// (250 ms) only delayed every login.
const pollInterval = 20 * time.Millisecond

// HTTPClient returns a client that trusts only root, for enrollment and ACME.
func HTTPClient(root *x509.Certificate) *http.Client {
	pool := x509.NewCertPool()
	pool.AddCert(root)
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout: 10 * time.Second,
			ForceAttemptHTTP2:   true,
			DialContext:         dialChecked,
		},
	}
}

// EnrollDevice redeems a one-time token, registering deviceKey's public half.
func EnrollDevice(ctx context.Context, hc *http.Client, serverURL, token string, deviceKey crypto.Signer) (EnrollResponse, error) {
	pubDER, err := x509.MarshalPKIXPublicKey(deviceKey.Public())
	if err != nil {
		return EnrollResponse{}, err
	}
	pub := base64.StdEncoding.EncodeToString(pubDER)
	sig, err := SignMessage(deviceKey, EnrollMessage(token, pub))
	if err != nil {
		return EnrollResponse{}, err
	}
	var out EnrollResponse
	err = postJSON(ctx, hc, serverURL+PathEnroll, EnrollRequest{Token: token, PublicKey: pub, Signature: sig}, &out)
	return out, err
}

// maxSignIns bounds the sign-ins one login makes when the server refuses
// them: one by the refresh token, one by the person, and no loop.
const maxSignIns = 2

// Credentials are a device certificate chain and its key.
type Credentials struct {
	Chain []*x509.Certificate // leaf first
	Key   *ecdsa.PrivateKey
}

// Login gets a fresh device certificate: a new key, attested by TP's enrollment
// endpoint on proof of the device key, then ACME device-attest-01 with EAB against
// the embedded CA. progress, if set, receives lines for a person.
func Login(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer, progress func(string)) (*Credentials, error) {
	return LoginSignedIn(ctx, hc, serverURL, deviceID, deviceKey, progress, nil)
}

// LoginSignedIn is Login for a device whose renewals may need a fresh
// sign-in at the identity provider: when the server asks for one
// (CodeSignIn), signIn is given its refusal and returns an ID token, and the
// request is made again with it, freshly signed (a sign-in may take
// minutes). A refused token makes the server ask again, up to
// maxSignIns times. Without signIn, the server's answer is the error.
func LoginSignedIn(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer, progress func(string), signIn func(context.Context, *ServerError) (string, error)) (*Credentials, error) {
	say := func(f string, a ...any) {
		if progress != nil {
			progress(fmt.Sprintf(f, a...))
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, err
	}
	pub := base64.StdEncoding.EncodeToString(pubDER)
	var att AttestResponse
	idToken := ""
	for tries := 0; ; tries++ {
		ts := time.Now().UTC().Format(time.RFC3339)
		sig, err := SignMessage(deviceKey, AttestMessage(deviceID, pub, ts))
		if err != nil {
			return nil, err
		}
		err = postJSON(ctx, hc, serverURL+PathAttest, AttestRequest{DeviceID: deviceID, PublicKey: pub, Time: ts, Signature: sig, IDToken: idToken}, &att)
		var se *ServerError
		if !errors.As(err, &se) || se.Code != CodeSignIn || signIn == nil || tries == maxSignIns {
			if err != nil {
				return nil, err
			}
			break
		}
		say("The server needs a fresh sign-in at the identity provider")
		if idToken, err = signIn(ctx, se); err != nil {
			return nil, fmt.Errorf("%s: %w", se.Message, err)
		}
	}
	attDER, err := base64.StdEncoding.DecodeString(att.Certificate)
	if err != nil {
		return nil, errors.New("server sent a malformed attestation certificate")
	}
	if !strings.HasPrefix(att.Directory, "/") {
		return nil, errors.New("server sent a malformed ACME directory path")
	}

	client := &acmez.Client{
		Client: &acmeproto.Client{
			Directory:    serverURL + att.Directory,
			HTTPClient:   hc,
			PollInterval: pollInterval,
		},
		ChallengeSolvers: map[string]acmez.Solver{
			acmeproto.ChallengeTypeDeviceAttest01: attestSolver{key: key, chain: [][]byte{attDER}, say: say},
		},
	}
	accountKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	account := acmeproto.Account{TermsOfServiceAgreed: true, PrivateKey: accountKey}
	if err := account.SetExternalAccountBinding(ctx, client.Client, acmeproto.EAB{KeyID: att.EABKeyID, MACKey: att.EABHMACKey}); err != nil {
		return nil, fmt.Errorf("ACME account binding: %w", explainACME(err))
	}
	account, err = client.NewAccount(ctx, account)
	if err != nil {
		return nil, fmt.Errorf("ACME account: %w", explainACME(err))
	}
	csr, err := deviceCSR(key, deviceID)
	if err != nil {
		return nil, err
	}
	certs, err := client.ObtainCertificate(ctx, acmez.OrderParameters{
		Account:     account,
		Identifiers: []acmeproto.Identifier{{Type: "permanent-identifier", Value: deviceID}},
		CSR:         acmez.StaticCSR(csr),
	})
	if err != nil {
		return nil, fmt.Errorf("ACME order: %w", explainACME(err))
	}
	if len(certs) == 0 {
		return nil, errors.New("ACME server issued no certificate")
	}
	chain, err := ParseCertsPEM(certs[0].ChainPEM)
	if err != nil {
		return nil, fmt.Errorf("issued certificate: %w", err)
	}
	if !publicKeysEqual(chain[0].PublicKey, &key.PublicKey) {
		return nil, errors.New("issued certificate is for another key")
	}
	return &Credentials{Chain: chain, Key: key}, nil
}

// Whoami asks the server for this device's user, groups and status, and, when
// chain (DER, leaf first) is given, whether the server accepts that certificate.
func Whoami(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer, chain ...[]byte) (WhoamiResponse, error) {
	return whoami(ctx, hc, serverURL, deviceID, deviceKey, "", chain)
}

// WhoamiByCertificate is Whoami for a device without its device key: the
// request is signed by certKey, the key of chain's leaf (required), a
// certificate TP's CA issued to deviceID, even an expired or revoked one.
func WhoamiByCertificate(ctx context.Context, hc *http.Client, serverURL, deviceID string, certKey crypto.Signer, chain ...[]byte) (WhoamiResponse, error) {
	if len(chain) == 0 {
		return WhoamiResponse{}, errors.New("whoami by certificate needs the certificate")
	}
	return whoami(ctx, hc, serverURL, deviceID, certKey, SignedByCertificate, chain)
}

func whoami(ctx context.Context, hc *http.Client, serverURL, deviceID string, key crypto.Signer, signedBy string, chain [][]byte) (WhoamiResponse, error) {
	ts := time.Now().UTC().Format(time.RFC3339)
	sig, err := SignMessage(key, WhoamiMessage(deviceID, ts))
	if err != nil {
		return WhoamiResponse{}, err
	}
	req := WhoamiRequest{DeviceID: deviceID, Time: ts, Signature: sig, SignedBy: signedBy}
	for _, der := range chain[:min(len(chain), MaxWhoamiChain)] {
		req.Certificate = append(req.Certificate, base64.StdEncoding.EncodeToString(der))
	}
	var out WhoamiResponse
	err = postJSON(ctx, hc, serverURL+PathWhoami, req, &out)
	return out, err
}

func deviceCSR(key crypto.Signer, deviceID string) (*x509.CertificateRequest, error) {
	san, err := authz.PermanentIdentifierSAN(deviceID)
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:         pkix.Name{CommonName: deviceID},
		ExtraExtensions: []pkix.Extension{san},
	}, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificateRequest(der)
}

// attestSolver answers device-attest-01 in step-ca's "step" format: a CBOR
// attestation object whose statement signs the key authorization with the
// attested key and carries the attestation certificate chain.
type attestSolver struct {
	key   *ecdsa.PrivateKey
	chain [][]byte
	say   func(string, ...any)
}

var _ acmez.Payloader = attestSolver{}

func (s attestSolver) Present(_ context.Context, ch acmeproto.Challenge) error {
	s.say("Solving challenge %s", ch.Token)
	return nil
}

func (attestSolver) CleanUp(context.Context, acmeproto.Challenge) error { return nil }

func (s attestSolver) Payload(_ context.Context, ch acmeproto.Challenge) (any, error) {
	sum := sha256.Sum256([]byte(ch.KeyAuthorization))
	sig, err := ecdsa.SignASN1(rand.Reader, s.key, sum[:])
	if err != nil {
		return nil, err
	}
	// step-ca reads "sig" as a CBOR byte string holding a CBOR-encoded signature.
	csig, err := cbor.Marshal(sig)
	if err != nil {
		return nil, err
	}
	x5c := make([]any, len(s.chain))
	for i, c := range s.chain {
		x5c[i] = c
	}
	obj, err := cbor.Marshal(map[string]any{
		"fmt": "step",
		"attStmt": map[string]any{
			"alg": -7, // ES256
			"sig": csig,
			"x5c": x5c,
		},
	})
	if err != nil {
		return nil, err
	}
	return map[string]string{"attObj": base64.RawURLEncoding.EncodeToString(obj)}, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type eq interface{ Equal(crypto.PublicKey) bool }
	k, ok := a.(eq)
	return ok && k.Equal(b)
}

// explainACME turns known ACME problems into sentences a person can act on.
func explainACME(err error) error {
	var p acmeproto.Problem
	if errors.As(err, &p) {
		detail := p.Detail
		if detail == "" {
			detail = p.Type
		}
		if strings.Contains(strings.ToLower(detail), "external account") || strings.Contains(p.Type, "externalAccount") {
			return fmt.Errorf("the CA refused the account binding (%s); run dlogin again", detail)
		}
		return fmt.Errorf("CA said: %s", detail)
	}
	return err
}

func get(ctx context.Context, hc *http.Client, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	return do(hc, req)
}

func postJSON(ctx context.Context, hc *http.Client, url string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	body, err := do(hc, req)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("%s answered with unexpected data: %w", url, err)
	}
	return nil
}

func do(hc *http.Client, req *http.Request) ([]byte, error) {
	resp, err := hc.Do(req)
	if err != nil {
		addr := req.URL.Host
		if req.URL.Port() == "" {
			addr = net.JoinHostPort(req.URL.Hostname(), "443")
		}
		if ce := ExplainConnect(addr, err); ce != err {
			return nil, ce
		}
		return nil, fmt.Errorf("cannot reach the TP server at %s: %w", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return nil, fmt.Errorf("reading answer from %s: %w", req.URL.Host, err)
	}
	if len(body) > maxResponse {
		return nil, fmt.Errorf("answer from %s is larger than %d bytes", req.URL.Host, maxResponse)
	}
	if resp.StatusCode/100 != 2 {
		var e ErrorResponse
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return nil, &ServerError{Status: resp.StatusCode, Message: e.Error, Code: e.Code}
		}
		return nil, &ServerError{Status: resp.StatusCode, Message: fmt.Sprintf("%s answered %s", req.URL.Path, resp.Status)}
	}
	return body, nil
}

// ServerError is a refusal from TP's enrollment endpoints; Message is for people.
type ServerError struct {
	Status  int
	Message string
	Code    string // ErrorResponse.Code
}

func (e *ServerError) Error() string { return "server refused: " + e.Message }
