package acme

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	stepacme "github.com/smallstep/certificates/acme"
	"github.com/smallstep/certificates/authority/policy"
	"github.com/smallstep/certificates/authority/provisioner"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/server/users"
)

// Reverse-name certificates. An agent that holds a reverse name (registered
// through the proxy's "listen") gets a server certificate for it from the
// provisioner below by ordinary ACME dns-01. The CA never looks at DNS: its
// challenge client answers TXT lookups from a store that only the name's owner
// can write to, through a request signed with its enrolled device key
// (login.PathReverseChallenge), and only while the proxy says that device holds
// the name. The provisioner may sign nothing but names under the reverse zone.

// ReverseProvisionerName is the ACME provisioner of reverse-name certificates;
// its directory is https://SERVER/acme/tp-reverse/directory.
const ReverseProvisionerName = "tp-reverse"

// ReverseCertLifetime is the lifetime of reverse-name certificates; agents renew
// them in the last third.
const ReverseCertLifetime = 24 * time.Hour

// reverseProvisionerID keys the reverse provisioner's account bindings.
const reverseProvisionerID = "tp-reverse-provisioner"

// txtTTL is how long a published challenge answer stays.
const txtTTL = 10 * time.Minute

// maxTXT bounds the answers stored at once; maxTXTPerName bounds one name's, so
// that one device (which can publish only for names it holds) cannot fill the store.
const (
	maxTXT        = 10000
	maxTXTPerName = 16
)

// TXTTTL, MaxTXT and MaxTXTPerName are the bounds above, for a TXTStore kept
// elsewhere (internal/server/pgstore).
const (
	TXTTTL        = txtTTL
	MaxTXT        = maxTXT
	MaxTXTPerName = maxTXTPerName
)

// TXTStore keeps the dns-01 answers that reverse-name owners publish
// (login.PathReverseChallenge) for the CA's TXT lookups: in memory for one
// tpd, in the shared database (internal/server/pgstore) when several tpd answer one
// name, since the agent's challenge request and its answer to the challenge
// may reach different instances.
type TXTStore interface {
	// Publish stores value for host ("_acme-challenge.<name>") for TXTTTL; the
	// same value again refreshes it. Past MaxTXTPerName answers for host or
	// MaxTXT in all it fails with an error that wraps ErrTXTFull.
	Publish(ctx context.Context, host, value string) error
	// Lookup returns the live answers for host.
	Lookup(ctx context.Context, host string) ([]string, error)
}

// ErrTXTFull is a TXTStore's refusal of an answer past its bounds.
var ErrTXTFull = errors.New("too many certificate requests are in flight")

// TXTFullError is ErrTXTFull for host (all names when empty), in words.
func TXTFullError(host string) error {
	if host == "" {
		return fmt.Errorf("%w; try again in a few minutes", ErrTXTFull)
	}
	return fmt.Errorf("%w for %s; try again in a few minutes", ErrTXTFull, strings.TrimPrefix(host, "_acme-challenge."))
}

func reverseProvisioners(zone string) provisioner.List {
	if zone == "" {
		return nil
	}
	return provisioner.List{&provisioner.ACME{
		ID:   reverseProvisionerID,
		Type: "ACME",
		Name: ReverseProvisionerName,
		// Accounts only through PathReverseAccount, which checks name ownership:
		// nobody else can fill the CA database with accounts and orders.
		RequireEAB: true,
		Challenges: []provisioner.ACMEChallenge{provisioner.DNS_01},
		Claims: &provisioner.Claims{
			MinTLSDur:     &provisioner.Duration{Duration: 5 * time.Minute},
			MaxTLSDur:     &provisioner.Duration{Duration: ReverseCertLifetime},
			DefaultTLSDur: &provisioner.Duration{Duration: ReverseCertLifetime},
		},
		Options: &provisioner.Options{X509: &provisioner.X509Options{
			// serverAuth only: a reverse-name certificate must never pass as a client.
			Template:     siteLeafTemplate,
			AllowedNames: &policy.X509NameOptions{DNSDomains: []string{"*." + zone}},
		}},
	}}
}

// txtStore holds dns-01 answers published by name owners.
type txtStore struct {
	mu sync.Mutex
	m  map[string][]txtValue // "_acme-challenge.<name>" → values
}

type txtValue struct {
	v       string
	expires time.Time
}

func newTXTStore() *txtStore { return &txtStore{m: map[string][]txtValue{}} }

func (s *txtStore) publish(host, value string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	n := 0
	for k, vs := range s.m {
		live := vs[:0]
		for _, v := range vs {
			if now.Before(v.expires) {
				live = append(live, v)
			}
		}
		if len(live) == 0 {
			delete(s.m, k)
		} else {
			s.m[k] = live
		}
		n += len(live)
	}
	if n >= maxTXT {
		return TXTFullError("")
	}
	vs := s.m[host]
	for i, v := range vs {
		if v.v == value { // a replayed request refreshes, it does not add
			vs[i].expires = now.Add(txtTTL)
			return nil
		}
	}
	if len(vs) >= maxTXTPerName {
		return TXTFullError(host)
	}
	s.m[host] = append(vs, txtValue{v: value, expires: now.Add(txtTTL)})
	return nil
}

func (s *txtStore) lookup(host string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, v := range s.m[host] {
		if time.Now().Before(v.expires) {
			out = append(out, v.v)
		}
	}
	return out
}

type memTXT struct{ *txtStore }

var _ TXTStore = memTXT{}

func (m memTXT) Publish(_ context.Context, host, value string) error { return m.publish(host, value) }
func (m memTXT) Lookup(_ context.Context, host string) ([]string, error) {
	return m.lookup(host), nil
}

// challengeClient is step-ca's challenge client: TXT lookups come from the store,
// and the CA reaches out to nothing, so it cannot be used to probe internal hosts.
// It is made per request: ctx is the request's, which step-ca's Client
// interface does not pass on.
type challengeClient struct {
	ctx context.Context
	txt TXTStore
}

var _ stepacme.Client = challengeClient{}

func (challengeClient) Get(string) (*http.Response, error) { return nil, errNoNetwork }
func (c challengeClient) LookupTxt(name string) ([]string, error) {
	vs, err := c.txt.Lookup(c.ctx, strings.ToLower(strings.TrimSuffix(name, ".")))
	if err != nil {
		return nil, fmt.Errorf("the challenge answers could not be read (%w); try again when the TP server's database is reachable", err)
	}
	return vs, nil
}
func (challengeClient) TLSDial(string, string, *tls.Config) (*tls.Conn, error) {
	return nil, errNoNetwork
}

func (e *Enroller) reverseChallenge(w http.ResponseWriter, r *http.Request) {
	var req login.ReverseChallengeRequest
	if !decode(w, r, &req) {
		return
	}
	dev, ok := e.checkDevice(w, r, req.DeviceID, req.Time, req.Signature, login.ReverseChallengeMessage(req.DeviceID, req.Name, req.Value, req.Time))
	if !ok {
		return
	}
	if !e.checkActive(w, dev) {
		return
	}
	name, ok := e.checkReverseOwner(w, dev, req.Name)
	if !ok {
		return
	}
	if req.Value == "" || len(req.Value) > 128 {
		writeErr(w, http.StatusBadRequest, "value must be the dns-01 key authorization digest")
		return
	}
	if err := e.CA.txt.Publish(r.Context(), "_acme-challenge."+name, req.Value); err != nil {
		if errors.Is(err, ErrTXTFull) {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		e.log().Error("reverse challenge answer not stored", "device", dev.ID, "name", name, "err", err)
		writeErr(w, http.StatusServiceUnavailable, "could not store the challenge answer (the TP server's database is unreachable?); try again in a few seconds, and see tpd's log")
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// checkReverseOwner refuses (and returns false) unless dev holds the reverse name.
func (e *Enroller) checkReverseOwner(w http.ResponseWriter, dev users.Device, reqName string) (string, bool) {
	name := strings.ToLower(strings.TrimSuffix(reqName, "."))
	owner, held := "", false
	if e.ReverseOwner != nil {
		owner, held = e.ReverseOwner(name)
	}
	if !held || owner != dev.ID {
		e.log().Warn("reverse certificate refused", "device", dev.ID, "name", name, "owner", owner)
		writeErr(w, http.StatusForbidden, fmt.Sprintf("%s is not registered to %s; run `tp expose` for it first (names belong to the device that registered them)", name, dev.ID))
		return name, false
	}
	return name, true
}

// reverseAccount mints a single-use account binding for the owner of a reverse name.
func (e *Enroller) reverseAccount(w http.ResponseWriter, r *http.Request) {
	var req login.ReverseAccountRequest
	if !decode(w, r, &req) {
		return
	}
	dev, ok := e.checkDevice(w, r, req.DeviceID, req.Time, req.Signature, login.ReverseAccountMessage(req.DeviceID, req.Name, req.Time))
	if !ok || !e.checkActive(w, dev) {
		return
	}
	if _, ok := e.checkReverseOwner(w, dev, req.Name); !ok || !e.checkBindingRate(w, dev) {
		return
	}
	eak, err := e.CA.acmeDB.CreateExternalAccountKey(r.Context(), reverseProvisionerID, "")
	if err != nil {
		e.log().Error("reverse account binding failed", "device", dev.ID, "err", err)
		writeErr(w, http.StatusInternalServerError, "could not create an ACME account binding; see tpd's log")
		return
	}
	writeJSON(w, http.StatusOK, login.ReverseAccountResponse{EABKeyID: eak.ID, EABHMACKey: base64.RawURLEncoding.EncodeToString(eak.HmacKey)})
}
