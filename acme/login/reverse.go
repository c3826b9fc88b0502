package login

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/mholt/acmez/v3"
	acmeproto "github.com/mholt/acmez/v3/acme"
)

// ReverseDirectoryPath is the ACME directory of reverse-name certificates.
const ReverseDirectoryPath = "/acme/tp-reverse/directory"

// ReverseCertificate gets a server certificate for name, a reverse name this
// device holds (it must have registered it with the proxy first), from TP's CA by
// ACME dns-01: the answer is published through a request signed by the device
// key, which the CA accepts only from the name's owner.
func ReverseCertificate(ctx context.Context, hc *http.Client, serverURL, deviceID string, deviceKey crypto.Signer, name string) (*Credentials, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	client := &acmez.Client{
		Client: &acmeproto.Client{Directory: serverURL + ReverseDirectoryPath, HTTPClient: hc, PollInterval: pollInterval},
		ChallengeSolvers: map[string]acmez.Solver{
			acmeproto.ChallengeTypeDNS01: reverseSolver{hc: hc, server: serverURL, deviceID: deviceID, key: deviceKey},
		},
	}
	accountKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	ts := time.Now().UTC().Format(time.RFC3339)
	sig, err := SignMessage(deviceKey, ReverseAccountMessage(deviceID, name, ts))
	if err != nil {
		return nil, err
	}
	var eab ReverseAccountResponse
	if err := postJSON(ctx, hc, serverURL+PathReverseAccount, ReverseAccountRequest{DeviceID: deviceID, Name: name, Time: ts, Signature: sig}, &eab); err != nil {
		return nil, err
	}
	account := acmeproto.Account{TermsOfServiceAgreed: true, PrivateKey: accountKey}
	if err := account.SetExternalAccountBinding(ctx, client.Client, acmeproto.EAB{KeyID: eab.EABKeyID, MACKey: eab.EABHMACKey}); err != nil {
		return nil, fmt.Errorf("ACME account binding for %s: %w", name, explainACME(err))
	}
	account, err = client.NewAccount(ctx, account)
	if err != nil {
		return nil, fmt.Errorf("ACME account for %s: %w", name, explainACME(err))
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{name}}, key)
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, err
	}
	certs, err := client.ObtainCertificate(ctx, acmez.OrderParameters{
		Account:     account,
		Identifiers: []acmeproto.Identifier{{Type: "dns", Value: name}},
		CSR:         acmez.StaticCSR(csr),
	})
	if err != nil {
		return nil, fmt.Errorf("certificate for %s: %w", name, explainACME(err))
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

// reverseSolver publishes the dns-01 answer through TP's signed endpoint.
type reverseSolver struct {
	hc       *http.Client
	server   string
	deviceID string
	key      crypto.Signer
}

func (s reverseSolver) Present(ctx context.Context, ch acmeproto.Challenge) error {
	ts := time.Now().UTC().Format(time.RFC3339)
	value := ch.DNS01KeyAuthorization()
	sig, err := SignMessage(s.key, ReverseChallengeMessage(s.deviceID, ch.Identifier.Value, value, ts))
	if err != nil {
		return err
	}
	var out struct{}
	return postJSON(ctx, s.hc, s.server+PathReverseChallenge, ReverseChallengeRequest{
		DeviceID: s.deviceID, Name: ch.Identifier.Value, Value: value, Time: ts, Signature: sig,
	}, &out)
}

func (reverseSolver) CleanUp(context.Context, acmeproto.Challenge) error { return nil }
