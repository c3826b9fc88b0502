package acme

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	stepacme "github.com/smallstep/certificates/acme"
	acmeapi "github.com/smallstep/certificates/acme/api"
	acmenosql "github.com/smallstep/certificates/acme/db/nosql"
	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/smallstep/certificates/db"
	"github.com/smallstep/nosql"
	"github.com/smallstep/nosql/database"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
)

// ProvisionerName is the ACME provisioner devices log in through; its directory is
// https://SERVER/acme/tp/directory.
const ProvisionerName = "tp"

// provisionerID keys EAB keys in the ACME database. Provisioners built in code have
// no ID unless one is set, and minting EAB keys needs one.
const provisionerID = "tp-device-provisioner"

// DefaultCertLifetime is the lifetime of device certificates.
const DefaultCertLifetime = 4 * time.Hour

// CA is step-ca's authority and ACME server embedded in tpd. It owns no listener:
// Handler is mounted on tpd's own HTTPS server.
type CA struct {
	pki     *PKI
	auth    *authority.Authority
	acmeDB  stepacme.DB
	store   nosql.DB   // the database under acmeDB and the authority, for Prune
	nonces  NonceStore // nonce.go
	linker  stepacme.Linker
	handler http.Handler
	txt     TXTStore // dns-01 answers for reverse names (reverse.go)

	siteNames     atomic.Pointer[map[string]bool] // sites.go; nil when the sites provisioner is off
	siteValidator SiteValidator
	siteHeld      func(name string) bool // sites.go; nil: no exposed names
	sitesOn       bool

	deviceEnds atomic.Pointer[func(deviceID string) time.Time] // SetDeviceEnds
	life       time.Duration                                   // of device certificates
}

// SetDeviceEnds gives the CA, for each device, the time its right to connect
// ends (a guest's share: acme/share.go), zero when none: a device
// certificate never outlives it.
func (c *CA) SetDeviceEnds(ends func(deviceID string) time.Time) { c.deviceEnds.Store(&ends) }

// deviceEnforcer ends a device certificate by its device's end
// (SetDeviceEnds), and refuses one past it. It runs for every certificate the
// authority signs and passes those of other provisioners.
type deviceEnforcer struct{ c *CA }

func (e deviceEnforcer) Enforce(leaf *x509.Certificate) error {
	ext, ok := provisioner.GetProvisionerExtension(&x509.Certificate{Extensions: leaf.ExtraExtensions})
	if !ok || ext.Name != ProvisionerName {
		return nil // siteEnforcer refuses a certificate without the extension
	}
	fn := e.c.deviceEnds.Load()
	if fn == nil {
		return nil
	}
	id, err := authz.DeviceIDOf(&x509.Certificate{Extensions: append(slices.Clip(leaf.Extensions), leaf.ExtraExtensions...)})
	if err != nil {
		return fmt.Errorf("a device certificate without one device identity: %w", err)
	}
	end := (*fn)(id)
	switch {
	case end.IsZero() || !end.Before(leaf.NotAfter):
		return nil
	case !end.After(leaf.NotBefore.Add(time.Minute)):
		return fmt.Errorf("device %s may no longer connect (its share ended at %s)", id, end.UTC().Format(time.RFC3339))
	}
	leaf.NotAfter = end
	return nil
}

// CAOptions configure the embedded CA.
type CAOptions struct {
	// DBPath is the bbolt database file (single process; it is locked while open).
	DBPath string
	// PostgreSQL, when set, replaces DBPath: a DSN (with its password) of the
	// PostgreSQL database that several tpd share, through step-ca's own
	// postgresql driver. The database must exist; the CA creates its tables
	// (callers serialise NewCA across instances, since CREATE TABLE IF NOT
	// EXISTS races in PostgreSQL).
	PostgreSQL string
	// CertLifetime of device certificates; DefaultCertLifetime when zero.
	CertLifetime time.Duration
	// DNSNames the CA answers to (used for links when a request has no Host).
	DNSNames []string
	// ReverseZone, when set, adds the reverse-name provisioner (reverse.go):
	// server certificates for "<name>.<ReverseZone>", issued to the name's owner.
	ReverseZone string
	// SiteNames or SiteValidator, when set, add the websites' provisioner
	// (sites.go): server certificates for exactly these names, by tls-alpn-01
	// or http-01 validated through SiteValidator, which must reach tpd itself.
	// SetSiteNames changes the names while the CA runs.
	SiteNames     []string
	SiteValidator SiteValidator
	// SiteHeld, when set with the websites' provisioner, reports whether a name
	// is held right now by an HTTP exposure (tp expose --http): the provisioner
	// then certifies it too, as long as it is held (sites.go).
	SiteHeld func(name string) bool
	// Nonces, when set, replaces the in-memory nonce store (several tpd share
	// one in the database); MaxNonces then does not apply.
	Nonces NonceStore
	// TXT, when set, replaces the in-memory store of reverse-name challenge
	// answers (reverse.go; several tpd share one in the database).
	TXT TXTStore
	// MaxNonces bounds the ACME nonces held at once (nonce.go); DefaultMaxNonces
	// when zero.
	MaxNonces int
}

// NewCA starts the embedded authority over pki with a bbolt database, or
// PostgreSQL when opts.PostgreSQL is set.
func NewCA(pki *PKI, opts CAOptions) (*CA, error) {
	life := opts.CertLifetime
	if life == 0 {
		life = DefaultCertLifetime
	}
	if life < 5*time.Minute || life > 24*time.Hour {
		return nil, fmt.Errorf("certificate lifetime %s must be between 5m and 24h", life)
	}
	if opts.DBPath == "" && opts.PostgreSQL == "" {
		return nil, errors.New("CA database path is required")
	}
	minDur := &provisioner.Duration{Duration: 5 * time.Minute}
	if life < minDur.Duration {
		minDur = &provisioner.Duration{Duration: life}
	}
	prov := &provisioner.ACME{
		ID:         provisionerID,
		Type:       "ACME",
		Name:       ProvisionerName,
		RequireEAB: true,
		// Only device attestation: this provisioner must never validate control of a
		// name by reaching out to the network, and its certificates are identities.
		Challenges:         []provisioner.ACMEChallenge{provisioner.DEVICE_ATTEST_01},
		AttestationFormats: []provisioner.ACMEAttestationFormat{provisioner.STEP},
		AttestationRoots:   login.PEMCert(pki.AttestRoot),
		Claims: &provisioner.Claims{
			MinTLSDur:     minDur,
			MaxTLSDur:     &provisioner.Duration{Duration: life},
			DefaultTLSDur: &provisioner.Duration{Duration: life},
		},
	}
	dbCfg := &db.Config{Type: "bbolt", DataSource: opts.DBPath}
	if opts.PostgreSQL != "" {
		dbCfg = &db.Config{Type: nosql.PostgreSQLDriver, DataSource: opts.PostgreSQL}
	}
	authDB, err := db.New(dbCfg)
	switch {
	case err != nil && opts.PostgreSQL != "":
		return nil, fmt.Errorf("open the CA's tables in the database: %w", err)
	case err != nil:
		return nil, fmt.Errorf("open CA database %s: %w (is another tpd running on this data dir?)", opts.DBPath, err)
	}
	sitesOn := len(opts.SiteNames) > 0 || opts.SiteValidator != nil
	dns := opts.DNSNames
	if len(dns) == 0 {
		dns = []string{"localhost"}
	}
	cfg := &config.Config{
		DNSNames: dns,
		DB:       dbCfg,
		AuthorityConfig: &config.AuthConfig{
			Provisioners: append(append(provisioner.List{prov}, reverseProvisioners(opts.ReverseZone)...), sitesProvisioners(sitesOn)...),
			Claims: &provisioner.Claims{
				MinTLSDur:     minDur,
				MaxTLSDur:     &provisioner.Duration{Duration: 24 * time.Hour},
				DefaultTLSDur: &provisioner.Duration{Duration: life},
			},
		},
	}
	c := &CA{life: life}
	auth, err := authority.NewEmbedded(
		authority.WithConfig(cfg),
		authority.WithX509Enforcers(siteEnforcer{c}, deviceEnforcer{c}),
		authority.WithDatabase(authDB),
		authority.WithX509RootCerts(pki.Root),
		authority.WithX509Signer(pki.Intermediate, pki.IntermediateKey),
		authority.WithQuietInit(),
	)
	if err != nil {
		authDB.Shutdown()
		return nil, fmt.Errorf("start embedded CA: %w", err)
	}
	nosqlDB, ok := authDB.(nosql.DB)
	if !ok {
		authDB.Shutdown()
		return nil, fmt.Errorf("CA database of type %T has no ACME support", authDB)
	}
	acmeDB, err := acmenosql.New(nosqlDB)
	if err != nil {
		authDB.Shutdown()
		return nil, fmt.Errorf("open ACME database: %w", err)
	}
	c.pki, c.auth, c.acmeDB, c.store = pki, auth, acmeDB, nosqlDB
	c.nonces = opts.Nonces
	if c.nonces == nil {
		c.nonces = memNonces{newNonceStore(opts.MaxNonces)}
	}
	c.linker = stepacme.NewLinker(dns[0], "acme")
	c.txt = opts.TXT
	if c.txt == nil {
		c.txt = memTXT{newTXTStore()}
	}
	if sitesOn {
		c.siteValidator, c.siteHeld, c.sitesOn = opts.SiteValidator, opts.SiteHeld, true
		_ = c.SetSiteNames(opts.SiteNames)
	}
	r := chi.NewRouter()
	r.Route("/acme", func(r chi.Router) { acmeapi.Route(r) })
	c.handler = r
	return c, nil
}

// MaxACMEBody bounds an ACME request body (a JWS). The largest TP sends, a
// device-attest-01 answer with its attestation certificate, is under 4 KiB.
const MaxACMEBody = 64 << 10

// Handler serves the ACME API under /acme/. The ACME handlers take their
// dependencies from the request context, which this handler fills in.
func (c *CA) Handler() http.Handler {
	acmeDB := nonceDB{DB: c.acmeDB, nonces: c.nonces}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !boundBody(w, r) {
			return
		}
		ctx := authority.NewContext(r.Context(), c.auth)
		ctx = db.NewContext(ctx, c.auth.GetDatabase())
		ctx = stepacme.NewContext(ctx, acmeDB, c.challengeClientFor(challengeClient{ctx: r.Context(), txt: c.txt}), c.linker, nil)
		c.handler.ServeHTTP(w, r.WithContext(ctx))
	})
}

// boundBody reads a request body of at most MaxACMEBody bytes into memory, or
// answers 413 and returns false. step-ca reads bodies whole without a limit.
func boundBody(w http.ResponseWriter, r *http.Request) bool {
	if r.Body == nil || r.Body == http.NoBody {
		return true
	}
	if r.ContentLength <= MaxACMEBody {
		b, err := io.ReadAll(io.LimitReader(r.Body, MaxACMEBody+1))
		if err != nil {
			WriteProblem(w, http.StatusBadRequest, "malformed", "could not read the request body: "+err.Error())
			return false
		}
		if len(b) <= MaxACMEBody {
			r.Body = io.NopCloser(bytes.NewReader(b))
			return true
		}
	}
	WriteProblem(w, http.StatusRequestEntityTooLarge, "malformed",
		fmt.Sprintf("request body is larger than %d KiB; an ACME request is a JWS of a few KiB", MaxACMEBody>>10))
	return false
}

// WriteProblem answers with an RFC 8555 problem document of type
// urn:ietf:params:acme:error:<typ>.
func WriteProblem(w http.ResponseWriter, status int, typ, detail string) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(struct {
		Type   string `json:"type"`
		Detail string `json:"detail"`
	}{"urn:ietf:params:acme:error:" + typ, detail})
}

// Nonces is the number of outstanding ACME nonces (at most CAOptions.MaxNonces).
func (c *CA) Nonces() int { return c.nonces.Len() }

// DirectoryPath is the path of the ACME directory on tpd's HTTPS server.
func DirectoryPath() string { return "/acme/" + ProvisionerName + "/directory" }

// NewEAB mints a single-use external account binding key for the provisioner.
func (c *CA) NewEAB(ctx context.Context) (keyID string, hmacKey []byte, err error) {
	eak, err := c.acmeDB.CreateExternalAccountKey(ctx, provisionerID, "")
	if err != nil {
		return "", nil, fmt.Errorf("create ACME account binding: %w", err)
	}
	return eak.ID, eak.HmacKey, nil
}

// ErrUnknownSerial means the CA has no certificate with that serial number.
var ErrUnknownSerial = errors.New("no certificate with that serial number was issued by this CA")

// IssuedCertificate returns the certificate this CA issued with serial number sn.
func (c *CA) IssuedCertificate(sn *big.Int) (*x509.Certificate, error) {
	crt, err := c.auth.GetDatabase().GetCertificate(sn.String())
	switch {
	case database.IsErrNotFound(err):
		return nil, ErrUnknownSerial
	case err != nil:
		return nil, fmt.Errorf("look up certificate %x in the CA database: %w", sn, err)
	}
	return crt, nil
}

// Close stops the authority and closes its database.
func (c *CA) Close() error { return c.auth.Shutdown() }

// DBPath is where NewCA keeps its database inside a data dir.
func DBPath(dataDir string) string { return filepath.Join(dataDir, "ca", "db") }

// errNoNetwork is every challenge client's answer to a request that would leave
// tpd: TP's CA never reaches out to validate a challenge, so it cannot be turned
// into a way to probe internal hosts (see challengeClient and siteClient).
var errNoNetwork = errors.New("TP's CA does not reach out to the network to validate challenges")
