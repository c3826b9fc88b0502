package authz

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"time"

	"github.com/tp-proxy/tp/policy"
)

// Directory answers which groups a device's user has, and whether the device may
// connect at all.
type Directory interface {
	// Lookup returns the groups of the device's user. It returns an error wrapping
	// ErrUnknownDevice or ErrRevoked when the device may not connect.
	Lookup(deviceID string) (groups []string, err error)
}

// Sentinels for errors.Is. Their texts are short because they end longer sentences:
// "device alice@laptop is not enrolled: unknown device".
var (
	// ErrUnknownDevice is wrapped by errors about devices TP has not enrolled.
	ErrUnknownDevice = errors.New("unknown device")
	// ErrRevoked is wrapped by errors about revoked users, devices and certificates.
	ErrRevoked = errors.New("revoked")
)

// revokedError carries a deny-list reason, written for a person, and matches ErrRevoked.
type revokedError struct{ reason string }

func (e *revokedError) Error() string        { return e.reason }
func (e *revokedError) Is(target error) bool { return target == ErrRevoked }

// Evaluator evaluates a policy for one input document. *policy.Engine satisfies it.
type Evaluator interface {
	Eval(ctx context.Context, input map[string]any) (policy.Result, error)
}

var (
	_ Evaluator  = (*policy.Engine)(nil)
	_ Authorizer = (*Policy)(nil)
)

// Reasons Authorize gives when it denies without the policy's word.
const (
	ReasonPolicyFailed = "policy evaluation failed; the request was denied"
)

// Policy is TP's Authorizer: identities are checked against a deny list and a
// directory, and requests are decided by a Rego policy. All fields but Logger are
// required for anything to be allowed; a Policy missing them denies everything.
type Policy struct {
	Directory Directory
	Evaluator Evaluator
	DenyList  *DenyList // nil: nothing is deny-listed
	Logger    *slog.Logger
	// Decisions, when set, receives one line per decision (see policy.DecisionLog).
	Decisions *policy.DecisionLog
}

// Verify turns a client certificate whose chain is already verified into a full
// Identity: the device identity from the certificate (see [IdentityFromCert]),
// checked against the deny list, plus the user's groups from the Directory. It is
// meant for tls.Config.VerifyConnection and for re-checking live sessions. Errors
// are written for the person holding the certificate; those about revoked or
// unknown devices wrap ErrRevoked or ErrUnknownDevice.
func (p *Policy) Verify(leaf *x509.Certificate) (Identity, error) {
	id, err := IdentityFromCert(leaf)
	if err != nil {
		return Identity{}, err
	}
	if reason, denied := p.DenyList.Denies(id); denied {
		return Identity{}, &revokedError{reason}
	}
	if p.Directory == nil {
		return Identity{}, fmt.Errorf("no device directory is configured, so %s cannot be checked; the connection was refused", id)
	}
	groups, err := p.Directory.Lookup(id.DeviceID)
	if err != nil {
		// The Directory's errors already name the device and say why.
		return Identity{}, fmt.Errorf("connection refused: %w", err)
	}
	// Copy, so the identity never shares memory with the directory, and sort, so
	// the policy input is stable.
	id.Groups = slices.Compact(slices.Sorted(slices.Values(groups)))
	if id.Groups == nil {
		id.Groups = []string{}
	}
	return id, nil
}

// Authorize decides req. The deny list and the certificate's expiry are checked
// first, without asking the policy. A policy error returns a denial together with
// the error, so callers that look only at the Decision still fail closed.
func (p *Policy) Authorize(ctx context.Context, req Request) (Decision, error) {
	if req.Time.IsZero() {
		req.Time = time.Now()
	}
	input := Input(req)
	d, res, err := p.decide(ctx, req, input)
	if rerr := p.Decisions.Record(input, d.Allow, d.Reason, res, err); rerr != nil && p.Logger != nil {
		p.Logger.Error("writing the decision log failed", "err", rerr)
	}
	return d, err
}

func (p *Policy) decide(ctx context.Context, req Request, input map[string]any) (Decision, policy.Result, error) {
	if reason, denied := p.DenyList.Denies(req.Identity); denied {
		return Decision{Allow: false, Reason: reason}, policy.Result{}, nil
	}
	if na := req.Identity.NotAfter; !na.IsZero() && req.Time.After(na) {
		return Decision{
			Allow:  false,
			Reason: fmt.Sprintf("the certificate of %s expired at %s; run dlogin", req.Identity, na.UTC().Format(time.RFC3339)),
		}, policy.Result{}, nil
	}
	if p.Evaluator == nil {
		return Decision{Allow: false, Reason: ReasonPolicyFailed}, policy.Result{}, errors.New("authorize: no policy evaluator is configured")
	}
	res, err := p.Evaluator.Eval(ctx, input)
	if err != nil {
		return Decision{Allow: false, Reason: ReasonPolicyFailed}, res,
			fmt.Errorf("authorize %s %s to %s: %w", req.Identity, req.Action, hostPort(req.Destination), err)
	}
	d := Decision{Allow: res.Allow, Reason: res.Reason}
	if !d.Allow && d.Reason == "" {
		d.Reason = fmt.Sprintf("policy does not allow %s to %s %s", req.Identity, req.Action, hostPort(req.Destination))
	}
	if l := p.Logger; l != nil && l.Enabled(ctx, slog.LevelDebug) {
		l.LogAttrs(ctx, slog.LevelDebug, "policy decision",
			slog.String("identity", req.Identity.DeviceID),
			slog.String("action", req.Action),
			slog.String("destination", hostPort(req.Destination)),
			slog.Bool("allow", d.Allow),
			slog.String("reason", d.Reason),
			slog.String("revision", res.Revision))
	}
	return d, res, nil
}

func hostPort(d Destination) string {
	return net.JoinHostPort(d.Host, strconv.Itoa(d.Port))
}

// Input builds the policy input document for req. Its field names are a contract
// with policy authors (see the default policy's header) and must not change:
//
//	action                "dial", "dial_udp", "listen" or "expose_public"
//	identity.user         "alice"
//	identity.device       "laptop"
//	identity.device_id    "alice@laptop"
//	identity.groups       array of strings, never null
//	identity.serial       certificate serial, lower-case hex
//	identity.expiry       certificate NotAfter, RFC 3339, UTC
//	destination.host      as asked
//	destination.port      number
//	destination.network   "tcp" or "udp"
//	destination.ips       array of strings (IPv4-mapped IPv6 as IPv4), never null;
//	                      [] when the name did not resolve (TP asks anyway, so that
//	                      a device the policy refuses learns nothing; nothing is dialed)
//	destination.embedded_ipv4  array of strings, never null: the IPv4 addresses
//	                      inside the SIIT, NAT64, 6to4, Teredo and IPv4-compatible
//	                      addresses of ips (see EmbeddedIPv4), which a policy
//	                      judges them by
//	destination.reverse   the reverse name (label before the reverse zone), only
//	                      for "listen" and for dials of a reverse listener
//	source.address        client address, host:port
//	source.transport      "tls" or "quic"
//	time                  req.Time, RFC 3339 with nanoseconds, UTC
//
// Input renders req as it is; Authorize fills a zero Time with the current time
// first. The values are only strings, numbers, arrays and objects, so the document
// converts to Rego without reflection and marshals to JSON as shown.
func Input(req Request) map[string]any {
	groups := make([]any, len(req.Identity.Groups))
	for i, g := range req.Identity.Groups {
		groups[i] = g
	}
	ips := make([]any, len(req.Destination.IPs))
	embedded := make([]any, 0)
	for i, ip := range req.Destination.IPs {
		// Unmap, so "::ffff:10.0.0.1" meets a policy's 10.0.0.0/8 as 10.0.0.1.
		ips[i] = ip.Unmap().String()
		if v4, ok := EmbeddedIPv4(ip); ok && !ip.Is4In6() { // mapped ones are in ips already
			embedded = append(embedded, v4.String())
		}
	}
	dest := map[string]any{
		"host":          req.Destination.Host,
		"port":          req.Destination.Port,
		"network":       req.Destination.Network,
		"ips":           ips,
		"embedded_ipv4": embedded,
	}
	if req.Destination.Reverse != "" { // only for reverse listeners
		dest["reverse"] = req.Destination.Reverse
	}
	return map[string]any{
		"action": req.Action,
		"identity": map[string]any{
			"user":      req.Identity.User,
			"device":    req.Identity.Device,
			"device_id": req.Identity.DeviceID,
			"groups":    groups,
			"serial":    req.Identity.Serial,
			"expiry":    req.Identity.NotAfter.UTC().Format(time.RFC3339),
		},
		"destination": dest,
		"source": map[string]any{
			"address":   req.Source.Address,
			"transport": req.Source.Transport,
		},
		"time": req.Time.UTC().Format(time.RFC3339Nano),
	}
}
