package policy

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/tp-proxy/tp/authz"
)

// Evaluator evaluates a policy for one input document. *Engine satisfies it.
type Evaluator interface {
	Eval(ctx context.Context, input map[string]any) (Result, error)
}

var (
	_ Evaluator        = (*Engine)(nil)
	_ authz.Authorizer = (*Authorizer)(nil)
	_ authz.Prechecker = (*Authorizer)(nil)
)

// Reasons Authorize gives when it denies without the policy's word.
const (
	ReasonFailed = "policy evaluation failed; the request was denied"
)

// Authorizer is TP's [authz.Authorizer]: identities are checked against a deny
// list and a directory, and requests are decided by a Rego policy. All fields but
// Logger are required for anything to be allowed; an Authorizer missing them
// denies everything.
type Authorizer struct {
	Directory authz.Directory
	Evaluator Evaluator
	DenyList  *authz.DenyList // nil: nothing is deny-listed
	Logger    *slog.Logger
	// Decisions, when set, receives one line per decision (see DecisionLog).
	Decisions *DecisionLog
}

// Verify is [authz.Verify] with the Authorizer's deny list and directory.
func (p *Authorizer) Verify(leaf *x509.Certificate) (authz.Identity, error) {
	return authz.Verify(leaf, p.DenyList, p.Directory)
}

// Authorize decides req. The deny list, the certificate's expiry and the
// device's scope (authz.Scope) are checked first, without asking the policy. A policy error returns a denial together with
// the error, so callers that look only at the Decision still fail closed.
func (p *Authorizer) Authorize(ctx context.Context, req authz.Request) (authz.Decision, error) {
	if req.Time.IsZero() {
		req.Time = time.Now()
	}
	sc := p.scope(req) // once per decision: the store's word, not the request's
	req.Identity.Guest = sc.Guest()
	input := authz.Input(req)
	d, res, err := p.decide(ctx, req, sc, input)
	if rerr := p.Decisions.Record(input, d.Allow, d.Reason, res, err); rerr != nil && p.Logger != nil {
		p.Logger.Error("writing the decision log failed", "err", rerr)
	}
	return d, err
}

func (p *Authorizer) decide(ctx context.Context, req authz.Request, sc authz.Scope, input map[string]any) (authz.Decision, Result, error) {
	if reason, denied := p.DenyList.Denies(req.Identity); denied {
		return authz.Decision{Allow: false, Reason: reason}, Result{}, nil
	}
	if na := req.Identity.NotAfter; !na.IsZero() && req.Time.After(na) {
		return authz.Decision{
			Allow:  false,
			Reason: fmt.Sprintf("the certificate of %s expired at %s; run dlogin", req.Identity, na.UTC().Format(time.RFC3339)),
		}, Result{}, nil
	}
	if ok, why := sc.Allows(req); !ok {
		return authz.Decision{Allow: false, Reason: why}, Result{}, nil
	}
	if p.Evaluator == nil {
		return authz.Decision{Allow: false, Reason: ReasonFailed}, Result{}, errors.New("authorize: no policy evaluator is configured")
	}
	res, err := p.Evaluator.Eval(ctx, input)
	if err != nil {
		return authz.Decision{Allow: false, Reason: ReasonFailed}, res,
			fmt.Errorf("authorize %s %s to %s: %w", req.Identity, req.Action, hostPort(req.Destination), err)
	}
	d := authz.Decision{Allow: res.Allow, Reason: res.Reason, Revision: res.Revision, Cached: res.Cached}
	if req.Action == authz.ActionIP && d.Allow {
		grant, err := ParseIPGrant(res.IP)
		if err != nil {
			return authz.Decision{Allow: false, Reason: ReasonFailed, Revision: res.Revision}, res,
				fmt.Errorf("authorize %s ip: policy (revision %s): %w", req.Identity, res.Revision, err)
		}
		d.IP = grant
	}
	if !d.Allow && d.Reason == "" {
		d.Reason = fmt.Sprintf("policy does not allow %s to %s", req.Identity, req.Asked())
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

// MayAllow reports whether some resolution of req's destination could make the
// policy allow req (see [Engine.MayAllow]); req's IPs are ignored. A denied
// identity, an expired certificate or an Evaluator that cannot tell gives the
// answer that costs nothing: false for the first two, whose Authorize denies
// whatever the addresses, and true for the last.
func (p *Authorizer) MayAllow(ctx context.Context, req authz.Request) (bool, error) {
	if _, denied := p.DenyList.Denies(req.Identity); denied {
		return false, nil
	}
	if req.Time.IsZero() {
		req.Time = time.Now()
	}
	if na := req.Identity.NotAfter; !na.IsZero() && req.Time.After(na) {
		return false, nil
	}
	sc := p.scope(req)
	if ok, _ := sc.Allows(req); !ok {
		return false, nil
	}
	pe, ok := p.Evaluator.(interface {
		MayAllow(ctx context.Context, input map[string]any) (bool, error)
	})
	if !ok {
		return true, nil
	}
	req.Identity.Guest = sc.Guest()
	may, err := pe.MayAllow(ctx, authz.Input(req))
	if err != nil {
		return false, fmt.Errorf("authorize %s %s to %s: %w", req.Identity, req.Action, hostPort(req.Destination), err)
	}
	return may, nil
}

// scope is the scope of req's device, read from the Directory at each
// decision (not from the request, whose identity may have crossed from another
// instance): a scope narrows what the device may do before the policy is
// asked (authz.Scope).
func (p *Authorizer) scope(req authz.Request) authz.Scope {
	if sc, ok := p.Directory.(authz.Scoper); ok {
		return sc.Scope(req.Identity.DeviceID)
	}
	return ""
}

func hostPort(d authz.Destination) string {
	return net.JoinHostPort(d.Host, strconv.Itoa(d.Port))
}
