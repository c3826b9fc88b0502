package clients

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients/transport"
)

// Client is a device that has logged in: it knows the server, trusts its root,
// and keeps its certificate fresh by itself while the device key is present.
type Client struct {
	Home    Home
	Profile Profile
	Root    *x509.Certificate
	// Logf receives messages for a person (stderr); nil discards them.
	Logf func(format string, args ...any)
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// SignIn signs the person in at the identity provider interactively,
	// for a renewal that needs a fresh sign-in and has no refresh token that
	// the provider still honours (dlogin sets it; tp cannot ask anyone).
	SignIn func(ctx context.Context, info login.SSOInfo) (login.Tokens, error)
	// FreshIDToken, when set, is an ID token of a sign-in just made (dlogin's
	// enrollment): the next login that needs a sign-in sends it first.
	FreshIDToken string

	mu   sync.Mutex
	cert *tls.Certificate
	rev  reverseCerts // reverse-name server certificates (exposecert.go)
}

// Open loads the client state from home.
func Open(home Home) (*Client, error) {
	p, err := home.Profile()
	if err != nil {
		return nil, err
	}
	root, err := home.Root()
	if err != nil {
		return nil, err
	}
	return &Client{Home: home, Profile: p, Root: root}, nil
}

func (c *Client) logf(f string, a ...any) {
	if c.Logf != nil {
		c.Logf(f, a...)
	}
}

func (c *Client) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// NeedsRenewal reports whether a certificate is in the last third of its life or past it.
func NeedsRenewal(leaf *x509.Certificate, now time.Time) bool {
	return transport.NeedsRenewal(leaf, now)
}

// Login gets a new certificate with the device key and stores it. It never
// prompts (ssh gives a ProxyCommand no terminal) unless SignIn is set: a
// device whose renewals need a fresh sign-in at the identity provider renews
// by the refresh token its home keeps, else by SignIn, else not
// (ErrSignInNeeded).
func (c *Client) Login(ctx context.Context, progress func(string)) (*login.Credentials, error) {
	key, err := c.Home.DeviceKey()
	if err != nil {
		return nil, err
	}
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections() // a fresh client per login: its connection is never reused
	sso := &ssoLogin{c: c}
	creds, err := login.LoginSignedIn(ctx, hc, c.Profile.Server, c.Profile.DeviceID, key, progress, sso.signIn)
	c.FreshIDToken = "" // used, or stale by the next login
	if err != nil {
		return nil, err
	}
	if err := sso.commit(); err != nil {
		return nil, err
	}
	if err := c.Home.SaveCredentials(creds); err != nil {
		return nil, fmt.Errorf("save certificate in %s: %w", c.Home.Dir, err)
	}
	c.mu.Lock()
	c.cert = nil
	c.mu.Unlock()
	return creds, nil
}

// Certificate returns a usable client certificate, renewing it first when it is in
// the last third of its life. If renewal fails while the certificate is still
// valid, the old one is used and the failure is reported through Logf.
func (c *Client) Certificate(ctx context.Context) (*tls.Certificate, error) {
	c.mu.Lock()
	cur := c.cert
	c.mu.Unlock()
	now := c.now()
	if cur != nil && !NeedsRenewal(cur.Leaf, now) {
		return cur, nil
	}
	cert, err := c.Home.Certificate()
	if err != nil {
		return nil, err
	}
	if NeedsRenewal(cert.Leaf, now) {
		renewed, rerr := c.renew(ctx)
		switch {
		case rerr == nil:
			cert = renewed
		case now.Before(cert.Leaf.NotAfter):
			c.logf("tp: could not renew the certificate (%v); using the current one, valid until %s", rerr, cert.Leaf.NotAfter.Local().Format(time.DateTime))
		case errors.Is(rerr, ErrNoDeviceKey):
			// dlogin needs the device key too: the advice is in rerr.
			return nil, fmt.Errorf("certificate expired at %s (%s ago), and it cannot be renewed: %w",
				cert.Leaf.NotAfter.Local().Format(time.DateTime), now.Sub(cert.Leaf.NotAfter).Round(time.Second), rerr)
		default:
			return nil, fmt.Errorf("certificate expired at %s (%s ago) and renewing it failed: %w; run dlogin",
				cert.Leaf.NotAfter.Local().Format(time.DateTime), now.Sub(cert.Leaf.NotAfter).Round(time.Second), rerr)
		}
	}
	c.mu.Lock()
	c.cert = &cert
	c.mu.Unlock()
	return &cert, nil
}

// currentLeaf is the certificate a full handshake would present now (loaded
// from disk on first use, never renewed here), or nil when there is none.
func (c *Client) currentLeaf() *x509.Certificate {
	c.mu.Lock()
	cur := c.cert
	c.mu.Unlock()
	if cur != nil {
		return cur.Leaf
	}
	cert, err := c.Home.Certificate()
	if err != nil {
		return nil
	}
	if !NeedsRenewal(cert.Leaf, c.now()) {
		c.mu.Lock()
		if c.cert == nil {
			c.cert = &cert
		}
		c.mu.Unlock()
	}
	return cert.Leaf
}

// renew logs in under the home lock; another process may have renewed meanwhile.
func (c *Client) renew(ctx context.Context) (tls.Certificate, error) {
	lctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	unlock, err := c.Home.Lock(lctx)
	if err != nil {
		return tls.Certificate{}, err
	}
	defer unlock()
	if cert, err := c.Home.Certificate(); err == nil && !NeedsRenewal(cert.Leaf, c.now()) {
		return cert, nil
	}
	if _, err := c.Login(lctx, nil); err != nil {
		return tls.Certificate{}, err
	}
	cert, err := c.Home.Certificate()
	if err != nil {
		return tls.Certificate{}, err
	}
	c.logf("tp: renewed certificate for %s, valid until %s", c.Profile.DeviceID, cert.Leaf.NotAfter.Local().Format(time.DateTime))
	return cert, nil
}

// Whoami asks the server for this device's user, groups and status, and
// whether it accepts the certificate on disk (when there is one): the answer's
// Certificate is nil only when none was sent.
func (c *Client) Whoami(ctx context.Context) (login.WhoamiResponse, error) {
	var chain [][]byte
	cert, certErr := c.Home.Certificate()
	if certErr == nil {
		chain = cert.Certificate
	}
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections()
	key, err := c.Home.DeviceKey()
	if err != nil {
		// Without the device key the certificate's own key proves who asks,
		// so the server can still say "revoked" or "expired".
		if signer, ok := cert.PrivateKey.(crypto.Signer); certErr == nil && ok {
			return login.WhoamiByCertificate(ctx, hc, c.Profile.Server, c.Profile.DeviceID, signer, chain...)
		}
		return login.WhoamiResponse{}, err
	}
	return login.Whoami(ctx, hc, c.Profile.Server, c.Profile.DeviceID, key, chain...)
}

// WhyRejected replaces err, when it is the server's refusal of the client
// certificate (ErrCertificateRejected, a bare TLS alert), by the reason the
// server gives when asked (whoami): a revoked device or user, a revoked or
// expired certificate. Any other err, or no answer, leaves err as it was.
func (c *Client) WhyRejected(ctx context.Context, err error) error {
	var re *transport.RejectedError
	if !errors.As(err, &re) {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	who, werr := c.Whoami(ctx)
	switch {
	case werr != nil:
		return err
	case who.Revoked:
		return fmt.Errorf("this device (%s) or its user is revoked%.0w on the TP server, which refused the TLS session: ask your TP administrator (dlogin cannot undo a revocation) (%w)", c.Profile.DeviceID, authz.ErrRevoked, re.Err)
	case who.Certificate != nil && !who.Certificate.Accepted:
		return fmt.Errorf("the TP server refuses this device's certificate: %s (%w)", who.Certificate.Reason, re.Err)
	}
	return err
}

// renewable says why this device cannot renew its certificate (nor log in
// with dlogin): its device key is missing; nil when it can.
func (c *Client) renewable() error {
	if _, err := c.Home.DeviceKey(); errors.Is(err, ErrNoDeviceKey) {
		return err
	}
	return nil
}

// Dialer returns a Dialer for the profile's server whose client certificate is
// kept fresh by c.
func (c *Client) Dialer() (*Dialer, error) {
	addr, err := c.Profile.ServerAddr()
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(c.Root)
	tickets := c.Home.TicketCache(c.currentLeaf)
	tickets.Now = c.now
	return &Dialer{
		Server:      addr,
		Cache:       c.Home.TransportCache(),
		device:      c.Profile.DeviceID,
		whyRejected: c.WhyRejected,
		renewable:   c.renewable,
		TLSConfig: &tls.Config{
			RootCAs: pool,
			// Resume TLS sessions (to tpd, and end to end to agents) with tickets kept
			// in TP_HOME: a long-running tp forward pays a full handshake once per
			// server, and so does the first of many `tp` processes ssh starts.
			ClientSessionCache: tickets,
			GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
				cert, err := c.Certificate(cri.Context())
				if err != nil {
					return nil, &transport.ClientCertError{Err: err} // no certificate to show: not the server's refusal
				}
				return cert, nil
			},
		},
	}, nil
}
