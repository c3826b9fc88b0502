package clients

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/lib/fileperm"
)

// Files inside $TP_HOME.
const (
	profileFile   = "profile.json"
	rootFile      = "root.pem"
	deviceKeyFile = "device.key"
	certFile      = "cert.pem"
	keyFile       = "key.pem"
	lockFile      = ".lock"
)

// ErrNoProfile means this device has never logged in.
var ErrNoProfile = errors.New("this device is not set up for TP")

// Home is the client's state directory ($TP_HOME; its default per platform is
// config.DefaultClientHome): the server's URL and root, the long-lived device
// key, and the current certificate.
type Home struct {
	Dir string
}

// Profile is what dlogin records on first login.
type Profile struct {
	Server      string `json:"server"` // https://host[:port]
	Fingerprint string `json:"fingerprint"`
	DeviceID    string `json:"device_id"`
	// Scope is the scope a grant gave this device, as the server said when
	// it was approved ("" for a person's device).
	Scope string `json:"scope,omitempty"`
}

// ServerAddr is the host:port of the server's TLS port.
func (p Profile) ServerAddr() (string, error) { return ServerAddr(p.Server) }

// ServerURLError is a TP server URL that is not the server's base URL,
// https://HOST[:PORT].
type ServerURLError struct {
	URL     string
	Problem string // what it should be, e.g. "without a path"
}

func (e *ServerURLError) Error() string {
	return fmt.Sprintf("the TP server's URL is its base URL, https://HOST[:PORT], %s (got %q)", e.Problem, e.URL)
}

// ServerBaseURL checks that serverURL is a TP server's base URL,
// https://HOST[:PORT], and returns it without a trailing "/". Anything else is
// a *ServerURLError: the client adds its own paths to this URL.
func ServerBaseURL(serverURL string) (string, error) {
	fail := func(problem string) (string, error) {
		return "", &ServerURLError{URL: serverURL, Problem: problem}
	}
	if !strings.Contains(serverURL, "://") {
		return fail("starting with https://")
	}
	u, err := url.Parse(serverURL)
	var ue *url.Error
	switch {
	case errors.As(err, &ue):
		return fail("that parses as a URL: " + ue.Err.Error())
	case err != nil:
		return fail("that parses as a URL: " + err.Error())
	case u.Scheme == "http":
		return fail("with https://, not http:// (tpd speaks only TLS)")
	case u.Scheme != "https":
		return fail("starting with https://")
	case u.Host == "" || u.Hostname() == "":
		return fail("with a host name")
	case u.User != nil:
		return fail("without a user name")
	case u.Path != "" && u.Path != "/":
		return fail("without a path")
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || u.Opaque != "":
		return fail("with nothing after HOST[:PORT]")
	}
	return "https://" + u.Host, nil
}

// ServerAddr turns https://host[:port] into host:port (port 443 by default).
func ServerAddr(serverURL string) (string, error) {
	base, err := ServerBaseURL(serverURL)
	if err != nil {
		return "", err
	}
	u, err := url.Parse(base)
	if err != nil {
		return "", err
	}
	if u.Port() == "" {
		return net.JoinHostPort(u.Hostname(), "443"), nil
	}
	return u.Host, nil
}

func (h Home) path(name string) string { return filepath.Join(h.Dir, name) }

// Init creates the directory, or takes over an existing one, readable by this
// user only: 0700 on Unix, an ACL for the user (and SYSTEM and Administrators)
// on Windows. The keys in it are also written private (0600) one by one.
func (h Home) Init() error {
	return fileperm.PrivateDir(h.Dir)
}

// Profile loads the profile.
func (h Home) Profile() (Profile, error) {
	b, err := os.ReadFile(h.path(profileFile))
	if errors.Is(err, os.ErrNotExist) {
		return Profile{}, fmt.Errorf("%w: no profile in %s; run dlogin --server URL --fingerprint SHA256:… --token … with the command your administrator gave you", ErrNoProfile, h.Dir)
	}
	if err != nil {
		return Profile{}, err
	}
	var p Profile
	if err := json.Unmarshal(b, &p); err != nil {
		return Profile{}, fmt.Errorf("%s is damaged (%v); run dlogin with your enrollment command again", h.path(profileFile), err)
	}
	return p, nil
}

// SaveProfile writes the profile.
func (h Home) SaveProfile(p Profile) error {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	return login.WriteFileAtomic(h.path(profileFile), append(b, '\n'), 0o600)
}

// Root loads the pinned TP root certificate.
func (h Home) Root() (*x509.Certificate, error) {
	b, err := os.ReadFile(h.path(rootFile))
	if err != nil {
		return nil, fmt.Errorf("TP root certificate missing in %s (%v); run dlogin with your enrollment command again", h.Dir, err)
	}
	certs, err := login.ParseCertsPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", h.path(rootFile), err)
	}
	return certs[0], nil
}

// SaveRoot writes the pinned root.
func (h Home) SaveRoot(c *x509.Certificate) error {
	return login.WriteFileAtomic(h.path(rootFile), login.PEMCert(c), 0o644)
}

// ErrNoDeviceKey means TP_HOME has no device key: the certificate can no longer
// be renewed, nor dlogin log in, and the device must be enrolled again.
var ErrNoDeviceKey = errors.New("the device key is missing")

// DeviceKey loads the device key. Its absence is ErrNoDeviceKey, with what to do.
func (h Home) DeviceKey() (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(h.path(deviceKeyFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s: without it this device can neither renew its certificate nor log in with dlogin, so it must be enrolled again: %s", ErrNoDeviceKey, h.Dir, h.ReenrollHint())
	}
	if err != nil {
		return nil, fmt.Errorf("cannot read the device key: %w", err)
	}
	k, err := login.ParseKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", h.path(deviceKeyFile), err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: not an ECDSA key", h.path(deviceKeyFile))
	}
	return ek, nil
}

// ReenrollHint says how this device is enrolled again: by an administrator's
// tpd enroll, then the dlogin line it prints.
func (h Home) ReenrollHint() string {
	enroll := "tpd enroll USER --device NAME"
	if p, err := h.Profile(); err == nil {
		if user, device, ok := strings.Cut(p.DeviceID, "@"); ok {
			enroll = "tpd enroll " + user + " --device " + device
		}
	}
	return "ask your TP administrator to run `" + enroll + "`, then run the dlogin line it prints"
}

// NewDeviceKey makes a fresh device key. Store it with SaveDeviceKey once the
// server has accepted it, so a failed enrollment never loses a working key.
func NewDeviceKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// SaveDeviceKey stores the device key (0600). It never leaves the machine.
func (h Home) SaveDeviceKey(k *ecdsa.PrivateKey) error {
	b, err := login.PEMKey(k)
	if err != nil {
		return err
	}
	return login.WriteFileAtomic(h.path(deviceKeyFile), b, 0o600)
}

// Certificate loads the current certificate and key.
func (h Home) Certificate() (tls.Certificate, error) {
	// key.pem holds the key and, after it, its chain: one file, replaced by one
	// rename, so a renewal in another process never pairs a new key with an old
	// certificate here, however long its writes take on a busy disk.
	if kb, err := os.ReadFile(h.path(keyFile)); err == nil && bytes.Contains(kb, []byte("-----BEGIN CERTIFICATE-----")) {
		c, err := tls.X509KeyPair(kb, kb)
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("certificate in %s is unreadable (%v); run dlogin", h.path(keyFile), err)
		}
		return c, nil
	}
	// A key.pem written before it carried the chain (an older tp): cert.pem
	// beside it. SaveCredentials replaces key.pem, then cert.pem: another
	// process renewing at this moment can leave a new key beside the old
	// certificate for an instant.
	c, err := tls.LoadX509KeyPair(h.path(certFile), h.path(keyFile))
	for i := 0; err != nil && strings.Contains(err.Error(), "does not match") && i < 10; i++ {
		time.Sleep(20 * time.Millisecond) // waiting out a concurrent renewal's second rename
		c, err = tls.LoadX509KeyPair(h.path(certFile), h.path(keyFile))
	}
	if errors.Is(err, os.ErrNotExist) {
		return tls.Certificate{}, fmt.Errorf("no certificate in %s; run dlogin", h.Dir)
	}
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("certificate in %s is unreadable (%v); run dlogin", h.Dir, err)
	}
	return c, nil
}

// SaveCredentials writes a new certificate chain and key: key.pem (0600) holds
// the key followed by the chain, which is what Certificate reads, so the pair
// changes in one rename; cert.pem (0644) holds the chain alone for other
// programs (curl --cert), written second.
func (h Home) SaveCredentials(cr *login.Credentials) error {
	kb, err := login.PEMKey(cr.Key)
	if err != nil {
		return err
	}
	var cb []byte
	for _, c := range cr.Chain {
		cb = append(cb, login.PEMCert(c)...)
	}
	if err := login.WriteFileAtomic(h.path(keyFile), append(kb, cb...), 0o600); err != nil {
		return err
	}
	return login.WriteFileAtomic(h.path(certFile), cb, 0o644)
}

// Lock takes an exclusive lock on the home directory so that concurrent tp
// processes (several ssh sessions at once) renew the certificate only once.
func (h Home) Lock(ctx context.Context) (unlock func(), err error) {
	f, err := os.OpenFile(h.path(lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		ok, err := tryLockFile(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", h.path(lockFile), err)
		}
		if ok {
			return func() { unlockFile(f); f.Close() }, nil
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("another tp or dlogin holds %s: %w", h.path(lockFile), ctx.Err())
		case <-time.After(50 * time.Millisecond): // poll: neither flock nor LockFileEx has a context-aware wait
		}
	}
}

// ticketsFile in $TP_HOME keeps TLS session tickets from the TP server (and from
// agents, end to end) across tp processes, so that every `tp` a ProxyCommand
// starts resumes instead of paying a full handshake with certificates.
const ticketsFile = "tickets.json"

// TicketCache returns a ticket cache kept in this home directory for the
// certificate leaf returns.
func (h Home) TicketCache(leaf func() *x509.Certificate) *TicketCache {
	return &TicketCache{Path: filepath.Join(h.Dir, ticketsFile), Leaf: leaf}
}

// transportCacheFile in $TP_HOME remembers which transport won the auto race.
const transportCacheFile = "transport-cache.json"

// TransportCache returns the cache kept in this home directory.
func (h Home) TransportCache() *TransportCache {
	return &TransportCache{Path: filepath.Join(h.Dir, transportCacheFile)}
}
