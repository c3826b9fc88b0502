package website

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/mholt/acmez/v3/acme"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// CertOptions configure Certs.
type CertOptions struct {
	// Names are the site names to keep certificates for.
	Names []string
	// OnDemand, when set, obtains certificates at the first handshake for a
	// name it allows (nil error), instead of for Names up front (which may then
	// be empty). It is asked before anything is loaded from storage or ordered
	// from the CA, so a name it refuses costs no ACME order.
	OnDemand func(ctx context.Context, name string) error
	// Capacity bounds the certificates kept in memory (certmagic's default,
	// unbounded, when zero); past it, random ones are evicted and loaded again
	// from storage when needed.
	Capacity int
	// Obtaining, when set, is called each time a certificate order begins for
	// name (certmagic's "cert_obtaining" event).
	Obtaining func(name string)
	// Storage is the directory for certificates, keys and the ACME account.
	Storage string
	// Shared, when set, is used instead of Storage: a certmagic storage that
	// several instances share (PostgreSQL), whose locks keep two of them from
	// ordering one certificate.
	Shared certmagic.Storage
	// CA is the ACME directory URL; Email the account's contact (may be empty).
	CA, Email string
	// TrustedRoots verify the ACME server; nil uses the system roots.
	TrustedRoots *x509.CertPool
	// EAB, when set, mints an external account binding the first time an account
	// is registered (TP's embedded CA requires one).
	EAB func(ctx context.Context) (keyID string, hmacKey []byte, err error)
	// ListenHost and TLSALPNPort are where tpd's public TLS port already listens:
	// certmagic then answers tls-alpn-01 through tpd's handshakes (GetCertificate)
	// instead of starting a listener of its own. HTTPPort is tpd's plain-HTTP port
	// (HTTPChallenge answers there); 0 disables http-01.
	ListenHost  string
	TLSALPNPort int
	HTTPPort    int
	// RenewCheckInterval is how often certificates are checked for renewal
	// (certmagic's default, 10 minutes, when zero).
	RenewCheckInterval time.Duration
	// Logger receives certmagic's log lines.
	Logger *slog.Logger
}

// Certs keeps the sites' certificates: obtained over ACME, stored on disk, renewed
// in the background at two thirds of their life without a restart.
type Certs struct {
	cache   *certmagic.Cache
	cfg     *certmagic.Config
	issuer  *certmagic.ACMEIssuer
	names   []string
	storage *trackedStorage
}

// NewCerts prepares certificate management; Manage starts it.
func NewCerts(o CertOptions) (*Certs, error) {
	if len(o.Names) == 0 && o.OnDemand == nil || o.Storage == "" && o.Shared == nil || o.CA == "" {
		return nil, errors.New("site certificates need names (or on-demand issuance), a storage directory and an ACME directory URL")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	zl := zap.New(slogCore{h: o.Logger.With("component", "certmagic").Handler()})
	c := &Certs{names: o.Names}
	c.cache = certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert:   func(certmagic.Certificate) (*certmagic.Config, error) { return c.cfg, nil },
		RenewCheckInterval: o.RenewCheckInterval,
		Capacity:           o.Capacity,
		Logger:             zl,
	})
	var storage certmagic.Storage = &certmagic.FileStorage{Path: o.Storage}
	if o.Shared != nil {
		storage = o.Shared
	}
	c.storage = &trackedStorage{Storage: storage}
	cmc := certmagic.Config{Storage: c.storage, Logger: zl}
	if o.OnDemand != nil {
		cmc.OnDemand = &certmagic.OnDemandConfig{DecisionFunc: o.OnDemand}
	}
	if o.Obtaining != nil {
		obtaining := o.Obtaining
		cmc.OnEvent = func(_ context.Context, event string, data map[string]any) error {
			if event == "cert_obtaining" {
				name, _ := data["identifier"].(string)
				obtaining(name)
			}
			return nil
		}
	}
	c.cfg = certmagic.New(c.cache, cmc)
	tmpl := certmagic.ACMEIssuer{
		CA:                      o.CA,
		TestCA:                  o.CA, // never fall back to Let's Encrypt's staging CA
		Email:                   o.Email,
		Agreed:                  true,
		TrustedRoots:            o.TrustedRoots,
		ListenHost:              o.ListenHost,
		AltTLSALPNPort:          o.TLSALPNPort,
		AltHTTPPort:             o.HTTPPort,
		DisableHTTPChallenge:    o.HTTPPort == 0,
		DisableTLSALPNChallenge: false,
		Logger:                  zl,
	}
	if o.TrustedRoots != nil { // a private CA, tpd's own by default: reach it directly
		tmpl.HTTPProxy = func(*http.Request) (*url.URL, error) { return nil, nil }
	}
	if o.EAB != nil {
		mint := o.EAB
		tmpl.NewAccountFunc = func(ctx context.Context, iss *certmagic.ACMEIssuer, acct acme.Account) (acme.Account, error) {
			keyID, key, err := mint(ctx)
			if err != nil {
				return acct, err
			}
			iss.ExternalAccount = &acme.EAB{KeyID: keyID, MACKey: base64.RawURLEncoding.EncodeToString(key)}
			return acct, nil
		}
	}
	c.issuer = certmagic.NewACMEIssuer(c.cfg, tmpl)
	c.cfg.Issuers = []certmagic.Issuer{c.issuer}
	return c, nil
}

// Manage loads the stored certificates and obtains or renews the others in the
// background, retrying with backoff; failures are logged. ctx ends the retries.
func (c *Certs) Manage(ctx context.Context) error {
	if len(c.names) == 0 { // on demand only
		return nil
	}
	if err := c.cfg.ManageAsync(ctx, c.names); err != nil {
		return fmt.Errorf("site certificates: %w", err)
	}
	return nil
}

// GetCertificate returns the certificate for the ClientHello's site name, or the
// tls-alpn-01 challenge certificate for an "acme-tls/1" handshake.
func (c *Certs) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return c.cfg.GetCertificate(hello)
}

// HTTPChallenge answers an ACME http-01 request and reports whether it did.
func (c *Certs) HTTPChallenge(w http.ResponseWriter, r *http.Request) bool {
	return c.issuer.HandleHTTPChallenge(w, r)
}

// Stop ends background renewal.
func (c *Certs) Stop() { c.cache.Stop() }

// StopAndWait is Stop for a server that stops: no certificate operation
// starts any more, and it waits (at most d) for those under way, whose
// context ended, to release their locks, so that none is left held in the
// storage (a lock file, or a row other instances would wait for) after it.
func (c *Certs) StopAndWait(d time.Duration) {
	c.cache.Stop()
	c.storage.stopAndWait(d)
}

// trackedStorage counts the locks certmagic holds in its storage, and takes
// no new one once stopping.
type trackedStorage struct {
	certmagic.Storage
	mu       sync.Mutex
	held     int
	stopping bool
	idle     chan struct{} // closed when stopping and nothing is held
}

var errStopping = errors.New("the server is stopping")

func (s *trackedStorage) Lock(ctx context.Context, name string) error {
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		return errStopping
	}
	s.held++
	s.mu.Unlock()
	if err := s.Storage.Lock(ctx, name); err != nil {
		s.release()
		return err
	}
	return nil
}

func (s *trackedStorage) Unlock(ctx context.Context, name string) error {
	err := s.Storage.Unlock(ctx, name)
	s.release()
	return err
}

func (s *trackedStorage) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.held--
	if s.stopping && s.held == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
}

func (s *trackedStorage) stopAndWait(d time.Duration) {
	s.mu.Lock()
	s.stopping = true
	if s.held == 0 {
		s.mu.Unlock()
		return
	}
	if s.idle == nil {
		s.idle = make(chan struct{})
	}
	idle := s.idle
	s.mu.Unlock()
	select {
	case <-idle:
	case <-time.After(d):
	}
}

// slogCore lets certmagic's zap logger write to TP's slog logger.
type slogCore struct{ h slog.Handler }

var _ zapcore.Core = slogCore{}

func slogLevel(l zapcore.Level) slog.Level {
	switch {
	case l <= zapcore.DebugLevel:
		return slog.LevelDebug
	case l == zapcore.InfoLevel:
		return slog.LevelInfo
	case l == zapcore.WarnLevel:
		return slog.LevelWarn
	default:
		return slog.LevelError
	}
}

func (c slogCore) Enabled(l zapcore.Level) bool {
	return c.h.Enabled(context.Background(), slogLevel(l))
}

func (c slogCore) With(fs []zapcore.Field) zapcore.Core { return slogCore{h: c.h.WithAttrs(attrs(fs))} }

func (c slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c slogCore) Write(e zapcore.Entry, fs []zapcore.Field) error {
	r := slog.NewRecord(e.Time, slogLevel(e.Level), e.Message, 0)
	r.AddAttrs(attrs(fs)...)
	return c.h.Handle(context.Background(), r)
}

func (slogCore) Sync() error { return nil }

func attrs(fs []zapcore.Field) []slog.Attr {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range fs {
		f.AddTo(enc)
	}
	out := make([]slog.Attr, 0, len(enc.Fields))
	for k, v := range enc.Fields {
		out = append(out, slog.Any(k, v))
	}
	return out
}
