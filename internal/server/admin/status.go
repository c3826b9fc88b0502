package admin

// The live view (`tpd status`) and the record of administrative acts that
// tpd's audit trail writes.

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"github.com/tp-proxy/tp/proxy"
)

// Act is one administrative act, one line of the audit trail.
type Act struct {
	// Act is what was done: enroll_token (a token issued), enrolled (a device
	// redeemed its token), revoke, unrevoke, unbind_user (a user's binding
	// to the provider's account cleared), grant_revoke (a person revoked one
	// of their grants), share (a person shared a name with a guest),
	// share_revoke, policy_reload, config_reload.
	Act string `json:"act"`
	// Subject is what it was done to: a device ID, user, serial or file.
	Subject string `json:"subject,omitempty"`
	// Via is how it was asked: "admin socket", "enrollment token", "single sign-on as EMAIL",
	// "SIGHUP", "policy directory change".
	Via string `json:"via"`
	// Result is "ok", "unchanged" or "refused"; Reason says why when not ok.
	Result         string `json:"result"`
	Reason         string `json:"reason,omitempty"`
	PolicyRevision string `json:"policy_revision,omitempty"`
	Remote         string `json:"remote,omitempty"` // the enrolling device's address
	Closed         int    `json:"sessions_closed,omitempty"`
	// Groups are the user's groups as an enroll_token set them; absent when
	// the request kept them.
	Groups []string `json:"groups,omitempty"`
	// Scope is the device's scope as an enroll_token gave it (authz.Scope).
	Scope string `json:"scope,omitempty"`
	// Changed lists the settings a config_reload changed ("max-conns: 10000 → 7"),
	// or what an unbind_user cleared ("sso-subject: \"s-1\" → none").
	Changed []string `json:"changed,omitempty"`
	// Guest and Until are a share's guest (an email address or @domain) and
	// end, on share and share_revoke.
	Guest string `json:"guest,omitempty"`
	Until string `json:"until,omitempty"`
}

// Denial is one recent policy denial.
type Denial struct {
	Time        time.Time `json:"time"`
	Identity    string    `json:"identity"`
	Transport   string    `json:"transport"`
	Action      string    `json:"action"`
	Destination string    `json:"destination"`
	Remote      string    `json:"remote"`
	Code        string    `json:"code"`
	Reason      string    `json:"reason"`
}

// Status is what a running tpd holds right now.
type Status struct {
	Version        string    `json:"version"`
	Time           time.Time `json:"time"`
	Started        time.Time `json:"started"`
	PolicyRevision string    `json:"policy_revision"`
	// Database names the shared PostgreSQL database and says whether this tpd
	// reaches it; empty when state is in the data dir.
	Database string `json:"database,omitempty"`
	// Instance is this tpd's name on the database; Instances lists every
	// instance there (tp_instances), or InstancesError says why it could not
	// be read. All empty when state is in the data dir.
	Instance       string              `json:"instance,omitempty"`
	Instances      []Instance          `json:"instances,omitempty"`
	InstancesError string              `json:"instances_error,omitempty"`
	Sessions       []proxy.LiveSession `json:"sessions"`
	Agents         []proxy.Agent       `json:"agents"`
	PublicPorts    []proxy.PublicPort  `json:"public_ports"`
	// Denials are the most recent policy denials, oldest first.
	Denials []Denial `json:"denials"`
	// Grants are the devices approvals gave applications, oldest first.
	Grants []Grant `json:"grants"`
	// Shares are the guest shares, oldest first.
	Shares []Share `json:"shares"`
}

// Grant is one device an approval gave an application (a grant).
type Grant struct {
	Device    string    `json:"device"`
	Scope     string    `json:"scope"`
	GrantedBy string    `json:"granted_by"`
	Created   time.Time `json:"created"`
	LastLogin time.Time `json:"last_login,omitzero"`
	// Revoked: in the store, on the deny list, or with its approver; Why says
	// which.
	Revoked bool   `json:"revoked"`
	Why     string `json:"why,omitempty"`
	// Agent: its agent is connected to this instance now.
	Agent bool `json:"agent"`
}

// Instance is one tpd on the shared database, as its row in tp_instances
// says.
type Instance struct {
	Name           string    `json:"name"`
	PeerAddress    string    `json:"peer_address"`
	PolicyRevision string    `json:"policy_revision"`
	Started        time.Time `json:"started"`
	// HeartbeatAge is the seconds since its last heartbeat (every
	// reverse-renew), on the database's clock.
	HeartbeatAge float64 `json:"heartbeat_age_seconds"`
	// Draining: it takes no new connections and waits for its live sessions.
	Draining bool `json:"draining"`
	// Stale: it missed two heartbeats (frozen, cut from the database, or
	// killed; a killed instance's row goes after an hour).
	Stale bool `json:"stale"`
	// Self is the instance that answered.
	Self bool `json:"self"`
}

func (s *Server) act(a Act) {
	if s.OnAct != nil {
		s.OnAct(a)
	}
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	if s.Status == nil {
		http.Error(w, "this tpd has no live view", http.StatusNotImplemented)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(s.Status(r.Context()))
}

// Status asks tpd what it holds right now.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var out Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &out)
	return out, err
}

func revokeAct(req RevokeRequest, res RevokeResponse, err error) Act {
	a := Act{Act: "revoke", Subject: req.Kind + " " + req.Value, Via: "admin socket", Result: "ok"}
	if req.Remove {
		a.Act = "unrevoke"
	}
	switch {
	case err != nil:
		a.Result, a.Reason = "refused", err.Error()
	case res.Already:
		a.Result, a.Subject, a.Closed = "unchanged", res.Kind+" "+res.Value, res.Closed
	default:
		a.Subject, a.Closed = res.Kind+" "+res.Value, res.Closed
	}
	return a
}
