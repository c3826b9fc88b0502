package tpd

// The audit trail (config key audit-log): one JSON line per session at its end
// and one per administrative act. Lines are built with encoding/json, never by
// concatenation, so a hostile name in a client's hello (a newline, a quote, a
// whole fake JSON object, invalid UTF-8) stays inside its string and cannot
// forge a line. The recent policy denials that `tpd status` shows are kept
// here too, whether or not the audit log is on.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/proxy"
)

// AuditLog writes the audit trail. It is safe for concurrent use; each line is
// one Write, so lines never interleave. Methods on a nil *AuditLog do nothing.
type AuditLog struct {
	mu   sync.Mutex
	path string // "" for stdout
	w    io.Writer
	f    *os.File // nil for stdout
	now  func() time.Time
}

// OpenAuditLog opens the log named by spec: "" is no log (nil, nil), "-" or
// "stdout" is stdout, anything else a file path, opened for appending and
// created 0600.
func OpenAuditLog(spec string) (*AuditLog, error) {
	switch spec {
	case "":
		return nil, nil
	case "-", "stdout":
		return &AuditLog{w: os.Stdout, now: time.Now}, nil
	}
	l := &AuditLog{path: spec, now: time.Now}
	if err := l.Reopen(); err != nil {
		return nil, err
	}
	return l, nil
}

// Reopen closes the audit file and opens it again by name, so that a rotated
// file is let go (logrotate without copytruncate). Stdout is left alone.
func (l *AuditLog) Reopen() error {
	if l == nil || l.path == "" {
		return nil
	}
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open audit log: %w", err)
	}
	l.mu.Lock()
	old := l.f
	l.f, l.w = f, f
	l.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
	return nil
}

// Close closes the audit file (not stdout).
func (l *AuditLog) Close() error {
	if l == nil || l.f == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	err := l.f.Close()
	l.f, l.w = nil, io.Discard
	if errors.Is(err, os.ErrClosed) {
		return nil
	}
	return err
}

// sessionLine is the audit line of a session.
type sessionLine struct {
	Time time.Time `json:"time"`
	Kind string    `json:"kind"` // "session"
	proxy.SessionRecord
	DurationSeconds float64 `json:"duration_seconds"`
}

// actLine is the audit line of an administrative act.
type actLine struct {
	Time time.Time `json:"time"`
	Kind string    `json:"kind"` // "admin"
	admin.Act
}

// Session writes the line of a session that ended.
func (l *AuditLog) Session(r proxy.SessionRecord) error {
	if l == nil {
		return nil
	}
	return l.write(sessionLine{Time: r.End.UTC(), Kind: "session", SessionRecord: r, DurationSeconds: r.End.Sub(r.Start).Seconds()})
}

// Admin writes the line of an administrative act.
func (l *AuditLog) Admin(a admin.Act) error {
	if l == nil {
		return nil
	}
	return l.write(actLine{Time: l.now().UTC(), Kind: "admin", Act: a})
}

func (l *AuditLog) write(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	b = append(b, '\n')
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, err := l.w.Write(b); err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	return nil
}

// maxDenials bounds the recent denials `tpd status` shows.
const maxDenials = 100

// denialRing keeps the most recent policy denials.
type denialRing struct {
	mu   sync.Mutex
	buf  [maxDenials]admin.Denial
	next int // where the next one goes
	n    int // how many are held
}

func (r *denialRing) add(d admin.Denial) {
	r.mu.Lock()
	r.buf[r.next] = d
	r.next = (r.next + 1) % maxDenials
	r.n = min(r.n+1, maxDenials)
	r.mu.Unlock()
}

// list returns the held denials, oldest first.
func (r *denialRing) list() []admin.Denial {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]admin.Denial, 0, r.n)
	for i := range r.n {
		out = append(out, r.buf[(r.next-r.n+i+maxDenials)%maxDenials])
	}
	return out
}

// sessionEnded is proxy.Config.OnSessionEnd: the audit line, and the ring of
// recent denials.
func (d *Daemon) sessionEnded(r proxy.SessionRecord) {
	if r.Decision == "deny" {
		d.denials.add(admin.Denial{Time: r.End.UTC(), Identity: r.Identity, Transport: r.Transport, Action: r.Action,
			Destination: r.Destination, Remote: r.Remote, Code: r.EndCode, Reason: r.EndReason})
	}
	if err := d.audit.Session(r); err != nil {
		d.log.Error("writing the audit log failed", "err", err)
	}
}

// AuditAdmin writes an administrative act to the audit trail (a reload, say).
func (d *Daemon) AuditAdmin(a admin.Act) {
	if err := d.audit.Admin(a); err != nil {
		d.log.Error("writing the audit log failed", "err", err)
	}
}

// ReopenAuditLog reopens the audit log file by name (after log rotation).
func (d *Daemon) ReopenAuditLog() error { return d.audit.Reopen() }

// deviceEnrolled is acme.Enroller.Enrolled.
func (d *Daemon) deviceEnrolled(dev users.Device, remote, via string) {
	d.AuditAdmin(admin.Act{Act: "enrolled", Subject: dev.ID, Via: via, Result: "ok", Remote: remote})
}

// policyReloaded records a policy reload that changed something or failed.
func (d *Daemon) policyReloaded(via string, err error) {
	a := admin.Act{Act: "policy_reload", Subject: d.cfg.PolicyDir(), Via: via, Result: "ok", PolicyRevision: d.policy.Revision()}
	if err != nil {
		a.Result, a.Reason = "refused", err.Error()
	}
	d.AuditAdmin(a)
}

// Status is the live view `tpd status` shows; with a database, the
// instances on it too (read within ctx, at most 5 s).
func (d *Daemon) Status(ctx context.Context) admin.Status {
	st := admin.Status{
		Version: Version, Time: time.Now().UTC(), Started: d.started, PolicyRevision: d.policy.Revision(),
		Sessions: d.proxy.LiveSessions(), Agents: d.proxy.Agents(), PublicPorts: d.proxy.PublicPorts(),
		Denials: d.denials.list(), Database: d.databaseStatus(), Instance: d.instance,
	}
	st.Instances, st.InstancesError = d.instances(ctx) // instances.go
	// Empty lists, not null, for scripts reading --json.
	if st.Agents == nil {
		st.Agents = []proxy.Agent{}
	}
	if st.PublicPorts == nil {
		st.PublicPorts = []proxy.PublicPort{}
	}
	st.Grants = d.grants(st.Agents)
	st.Shares = admin.ShareStates(d.users, func(id string) bool {
		u, dev, _ := authz.SplitDeviceID(id)
		_, denied := d.authz.DenyList.Denies(authz.Identity{DeviceID: id, User: u, Device: dev})
		return denied
	}, time.Now())
	return st
}

// grants lists the devices approvals gave applications, oldest first, with
// whether each is revoked (and how) and has its agent connected here.
func (d *Daemon) grants(agents []proxy.Agent) []admin.Grant {
	online := map[string]bool{}
	for _, a := range agents {
		online[a.Identity] = true
	}
	var granted []users.Device
	for _, u := range d.users.Users() {
		for _, dv := range u.Devices {
			if dv.IsGrant() {
				granted = append(granted, dv)
			}
		}
	}
	users.SortDevices(granted)
	out := []admin.Grant{}
	for _, g := range granted {
		ag := admin.Grant{Device: g.ID, Scope: string(g.Scope), GrantedBy: g.GrantedBy, Created: g.Created, LastLogin: g.LastLogin, Agent: online[g.ID]}
		id := authz.Identity{DeviceID: g.ID, User: g.User, Device: g.Name}
		if g.Revoked {
			ag.Revoked, ag.Why = true, "for good (its key can never be granted again)"
		} else if reason, denied := d.authz.DenyList.Denies(id); denied {
			ag.Revoked, ag.Why = true, reason
		} else if reason, denied := d.authz.DenyList.DeniesApprover(id, g.GrantedBy); denied {
			ag.Revoked, ag.Why = true, reason
		} else if _, err := d.users.Lookup(g.ID); err != nil {
			ag.Revoked, ag.Why = true, err.Error()
		}
		out = append(out, ag)
	}
	return out
}

// shared records a share of a name with a guest (acme.Enroller.Shared).
func (d *Daemon) shared(sh users.Share, remote string) {
	d.AuditAdmin(admin.Act{Act: "share", Subject: sh.ID, Via: "its person's " + approverWords(sh.By), Result: "ok", Remote: remote,
		Scope: "guest:" + sh.Name, Guest: sh.Guest, Until: sh.Until.UTC().Format(time.RFC3339)})
}

// shareRevoked records a share its person revoked and ends its guests'
// sessions at once (acme.Enroller.ShareRevoked).
func (d *Daemon) shareRevoked(sh users.Share, by, remote string) {
	d.AuditAdmin(admin.Act{Act: "share_revoke", Subject: sh.ID, Via: "its person's " + approverWords(by), Result: "ok", Remote: remote,
		Scope: "guest:" + sh.Name, Guest: sh.Guest})
	d.recheckIfChanged(context.Background())
}

// approverWords names an approver (users.Share.By) for the audit trail.
func approverWords(by string) string {
	if sub, ok := strings.CutPrefix(by, users.SignInApprover); ok {
		return "sign-in on the website (subject " + sub + ")"
	}
	if who, ok := strings.CutPrefix(by, "sign-in as "); ok { // a revocation on the website
		return "sign-in on the website as " + who
	}
	return "device " + by
}

// grantRevoked records a grant its person revoked and ends its sessions at
// once (acme.Enroller.GrantRevoked).
func (d *Daemon) grantRevoked(g users.Device, by, remote string) {
	d.AuditAdmin(admin.Act{Act: "grant_revoke", Subject: g.ID, Via: "its person's device " + by, Result: "ok", Remote: remote, Scope: string(g.Scope)})
	d.recheckIfChanged(context.Background())
}
