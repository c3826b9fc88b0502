// Package admin is tpd's local administration API: HTTP with JSON over a unix
// socket in the data dir (mode 0600), so only the user running tpd (and root) can
// enroll devices or list users. `tpd enroll` and `tpd users` are its clients.
package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

// EnrollRequest asks for a one-time enrollment token.
type EnrollRequest struct {
	User   string   `json:"user"`
	Device string   `json:"device"`
	Groups []string `json:"groups,omitempty"` // nil keeps the user's groups
	TTL    string   `json:"ttl,omitempty"`    // Go duration; empty uses the server default
	// Scope, when set, narrows what the device may do before the policy is
	// asked (authz.Scope, e.g. "expose:ci"); empty keeps the device's.
	Scope string `json:"scope,omitempty"`
}

// EnrollResponse carries everything needed to print the dlogin command.
type EnrollResponse struct {
	Token       string    `json:"token"`
	DeviceID    string    `json:"device_id"`
	Expires     time.Time `json:"expires"`
	ServerURL   string    `json:"server_url"`
	Fingerprint string    `json:"fingerprint"`
	Scope       string    `json:"scope,omitempty"` // the scope given with this token
}

// RevokeRequest puts an entry on tpd's deny list, or takes it off (Remove).
type RevokeRequest struct {
	Kind   string `json:"kind"` // "user", "device" or "serial"
	Value  string `json:"value"`
	Remove bool   `json:"remove,omitempty"`
}

// RevokeResponse says what changed.
type RevokeResponse struct {
	Kind    string    `json:"kind"`
	Value   string    `json:"value"` // as stored (device IDs as user@device)
	Removed bool      `json:"removed,omitempty"`
	Already bool      `json:"already,omitempty"` // the entry was on the list before; nothing changed
	Since   time.Time `json:"since,omitzero"`    // when the entry was put on the list
	Device  string    `json:"device,omitempty"`  // for a serial: the device the certificate was issued to
	Closed  int       `json:"closed"`            // live sessions closed at once, on this instance
	// KeptIn is where the deny list is stored: its file in the data dir, or
	// "database" when tpd keeps its state in PostgreSQL (database: in
	// tpd.yaml), which every instance on it reads.
	KeptIn string `json:"kept_in,omitempty"`
	// OtherInstances names the other instances on the same database with a
	// current heartbeat: each hears of the change from the database and
	// re-checks its own live sessions within seconds (Closed does not count
	// them). Empty when there are none; nil when there is no database or it
	// could not be read.
	OtherInstances []string `json:"other_instances"`
}

// KeptInDatabase is RevokeResponse.KeptIn for a deny list in PostgreSQL.
const KeptInDatabase = "database"

// Summary is what `tpd revoke` prints about res: what changed, the live
// sessions closed, here and (with a database) on the other instances, and
// where the entry is kept.
func (res RevokeResponse) Summary() string {
	what := res.Kind + " " + res.Value
	if res.Device != "" {
		what += " (of " + res.Device + ")"
	}
	shared := res.KeptIn == KeptInDatabase
	everywhere := ""
	if shared {
		everywhere = " on every instance"
	}
	switch {
	case res.Removed:
		return fmt.Sprintf("Removed %s from the deny list%s; it can connect again (if enrolled and allowed by policy).", what, everywhere)
	case res.Already:
		// The other instances had the entry already: nothing tells them to re-check.
		return fmt.Sprintf("%s%s was already revoked (since %s); nothing changed, %s.",
			strings.ToUpper(what[:1]), what[1:], when(res.Since), res.closedText(false))
	}
	msg := fmt.Sprintf("Revoked %s: new connections are refused%s, and %s.", what, everywhere, res.closedText(true))
	switch {
	case shared:
		msg += " The entry is kept in the database (database: in tpd.yaml), which every instance reads."
	case res.KeptIn != "":
		msg += " The entry is kept in " + res.KeptIn + "."
	}
	return msg
}

// closedText says which live sessions the revocation closed, and with others
// which the other instances close.
func (res RevokeResponse) closedText(others bool) string {
	here := ""
	if res.KeptIn == KeptInDatabase {
		here = " on this instance"
	}
	sessions := fmt.Sprintf("%d live sessions%s were closed", res.Closed, here)
	if res.Closed == 1 {
		sessions = "1 live session" + here + " was closed"
	}
	if here == "" || !others {
		return sessions
	}
	switch n := len(res.OtherInstances); {
	case res.OtherInstances == nil:
		return sessions + "; the other instances close theirs within seconds"
	case n == 0:
		return sessions + " (no other instance is running)"
	case n == 1:
		return sessions + "; the other instance, " + res.OtherInstances[0] + ", closes its own within seconds"
	case n <= 5:
		return fmt.Sprintf("%s; the %d other instances (%s) close theirs within seconds", sessions, n, strings.Join(res.OtherInstances, ", "))
	default:
		return fmt.Sprintf("%s; the %d other instances (%s and %d more) close theirs within seconds", sessions, n, strings.Join(res.OtherInstances[:4], ", "), n-4)
	}
}

// when prints a time for people, or "unknown" for entries that recorded none.
func when(t time.Time) string {
	if t.IsZero() {
		return "unknown"
	}
	return t.Local().Format(time.DateTime)
}

// DenyEntry is one entry of the deny list.
type DenyEntry struct {
	Kind   string    `json:"kind"` // "user", "device" or "serial"
	Value  string    `json:"value"`
	Since  time.Time `json:"since,omitzero"`   // zero when not recorded (entries from older versions)
	Device string    `json:"device,omitempty"` // for a serial: the device the certificate was issued to
}

// Revoker keeps the deny list; tpd's Daemon implements it.
type Revoker interface {
	// Revoke fails, changing nothing, for a user, device or serial the server
	// does not know, and for removing an entry that is not on the list.
	Revoke(ctx context.Context, kind, value string, remove bool) (RevokeResponse, error)
	// DenyEntries lists the deny list, users first, then devices, then serials.
	DenyEntries() []DenyEntry
}

// Server answers on the admin socket.
type Server struct {
	Users       users.Store
	Revoker     Revoker  // nil: revocation is not available
	Reloader    Reloader // nil: `tpd reload` is not available (reload.go)
	ServerURL   string
	Fingerprint string
	TokenTTL    time.Duration
	Logger      *slog.Logger
	// Status, when set, answers GET /v1/status (status.go); OnAct, when set,
	// receives each administrative act for the audit trail.
	Status func(context.Context) Status
	OnAct  func(Act)
}

// Handler serves POST /v1/enroll and GET /v1/users.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/enroll", s.enroll)
	mux.HandleFunc("GET /v1/users", s.users)
	mux.HandleFunc("GET /v1/shares", s.shares)
	mux.HandleFunc("POST /v1/revoke", s.revoke)
	mux.HandleFunc("POST /v1/unbind", s.unbind) // unbind.go
	mux.HandleFunc("GET /v1/denylist", s.denylist)
	mux.HandleFunc("GET /v1/status", s.status)
	mux.HandleFunc("POST /v1/reload", s.reload)
	return mux
}

func (s *Server) revoke(w http.ResponseWriter, r *http.Request) {
	if s.Revoker == nil {
		http.Error(w, "this tpd has no deny list", http.StatusNotImplemented)
		return
	}
	var req RevokeRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		http.Error(w, "malformed request: "+err.Error(), http.StatusBadRequest)
		return
	}
	res, err := s.Revoker.Revoke(r.Context(), req.Kind, req.Value, req.Remove)
	s.act(revokeAct(req, res, err))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(res)
}

func (s *Server) denylist(w http.ResponseWriter, _ *http.Request) {
	if s.Revoker == nil {
		http.Error(w, "this tpd has no deny list", http.StatusNotImplemented)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(s.Revoker.DenyEntries())
}

func (s *Server) enroll(w http.ResponseWriter, r *http.Request) {
	var req EnrollRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		http.Error(w, "malformed request: "+err.Error(), http.StatusBadRequest)
		return
	}
	ttl := s.TokenTTL
	if req.TTL != "" {
		d, err := time.ParseDuration(req.TTL)
		if err != nil {
			http.Error(w, fmt.Sprintf("ttl %q is not a duration like 24h", req.TTL), http.StatusBadRequest)
			return
		}
		ttl = d
	}
	scope, err := authz.ParseScope(req.Scope)
	if err == nil && scope.Guest() != "" {
		err = fmt.Errorf("scope %q: a guest's scope comes only from a share (tp share NAME --with GUEST), which ends it; enrol with expose:LABEL, expose-public:LABEL, dial:LABEL or dial:*", req.Scope)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	enr, err := s.Users.Enroll(req.User, req.Device, req.Groups, ttl)
	if err != nil {
		s.act(Act{Act: "enroll_token", Subject: req.User + "@" + req.Device, Via: "admin socket", Result: "refused", Reason: err.Error()})
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if scope != "" {
		// Before the token leaves tpd: whoever redeems it gets the scoped device.
		if err := s.Users.SetScope(enr.DeviceID, scope); err != nil {
			_, _ = s.Users.DropTokens(req.User, req.Device)
			s.act(Act{Act: "enroll_token", Subject: enr.DeviceID, Via: "admin socket", Result: "refused", Reason: err.Error()})
			http.Error(w, "the device's scope could not be recorded, so no token was issued: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
	}
	s.act(Act{Act: "enroll_token", Subject: enr.DeviceID, Via: "admin socket", Result: "ok", Groups: req.Groups, Scope: string(scope)})
	if s.Logger != nil {
		s.Logger.Info("enrollment token issued", "device", enr.DeviceID, "expires", enr.Expires)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(EnrollResponse{
		Token: enr.Token, DeviceID: enr.DeviceID, Expires: enr.Expires,
		ServerURL: s.ServerURL, Fingerprint: s.Fingerprint, Scope: string(scope),
	})
}

// shares lists the guest shares, oldest first, with their state.
func (s *Server) shares(w http.ResponseWriter, _ *http.Request) {
	var denied func(string) bool
	if s.Revoker != nil {
		dl := map[string]bool{}
		for _, e := range s.Revoker.DenyEntries() {
			dl[e.Kind+":"+e.Value] = true
		}
		denied = func(id string) bool {
			u, _, _ := strings.Cut(id, "@")
			return dl["device:"+id] || dl["user:"+u]
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(ShareStates(s.Users, denied, time.Now()))
}

// Share is a guest share as tpd tokens and tpd status show it.
type Share struct {
	users.Share
	// State is "active", "ended" (past its end, or its approver is gone or
	// on the deny list) or "revoked".
	State string `json:"state"`
	// Guests are the devices guests enrolled with it.
	Guests []string `json:"guests"`
}

// ShareStates lists store's shares, oldest first, with their state at now;
// denied says which devices the deny list revokes (nil: none).
func ShareStates(store users.Store, denied func(deviceID string) bool, now time.Time) []Share {
	shares := store.Shares()
	a, guests := users.ListApprovers(store.Users(), shares)
	out := []Share{}
	for _, sh := range shares {
		st := Share{Share: sh, State: a.ShareState(sh, now, denied), Guests: guests[sh.ID]}
		if st.Guests == nil {
			st.Guests = []string{}
		}
		out = append(out, st)
	}
	return out
}

// users lists the user store with the deny list applied: a user or device on
// the deny list is shown as revoked, with the time it was put there.
func (s *Server) users(w http.ResponseWriter, _ *http.Request) {
	list := s.Users.Users()
	if s.Revoker != nil {
		since := map[string]time.Time{}
		for _, e := range s.Revoker.DenyEntries() {
			since[e.Kind+":"+e.Value] = e.Since
		}
		for i := range list {
			u := &list[i]
			if t, ok := since["user:"+u.Name]; ok {
				u.Revoked, u.RevokedAt = true, t
			}
			for j := range u.Devices {
				dv := &u.Devices[j]
				if t, ok := since["device:"+dv.ID]; ok && !dv.Revoked {
					dv.Revoked, dv.RevokedAt = true, t
				}
			}
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(list)
}

// Listen creates the unix socket at path with mode 0600, replacing a stale socket
// left by a crashed tpd but refusing to steal one that a running tpd answers on.
func Listen(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("another tpd is already serving this data dir (its admin socket %s answers)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale admin socket: %w", err)
	}
	// The socket is made in a private directory beside path and moved into
	// place once it is 0600, so it is never reachable with another mode. The
	// process's umask is not touched: every goroutine shares it, and a
	// directory another one made meanwhile got its mask (0600: no search bit,
	// so that tpd, not being root, could create nothing in it).
	dir, err := os.MkdirTemp(filepath.Dir(path), ".a")
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	defer os.RemoveAll(dir)
	ln, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	ul := ln.(*net.UnixListener)
	ul.SetUnlinkOnClose(false) // its name is path now: unixListener removes that
	if err := errors.Join(os.Chmod(filepath.Join(dir, "s"), 0o600), os.Rename(filepath.Join(dir, "s"), path)); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	return &unixListener{UnixListener: ul, path: path}, nil
}

// unixListener removes its socket's name when closed, as net's listeners do
// with the name they were made with.
type unixListener struct {
	*net.UnixListener
	path string
	once sync.Once
}

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() { _ = os.Remove(l.path) })
	return err
}

// Client talks to a running tpd through its admin socket.
type Client struct {
	Socket string
	hc     *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	return &Client{Socket: path, hc: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}}
}

// Enroll asks tpd for a token.
func (c *Client) Enroll(ctx context.Context, req EnrollRequest) (EnrollResponse, error) {
	var out EnrollResponse
	b, _ := json.Marshal(req)
	err := c.do(ctx, http.MethodPost, "/v1/enroll", b, &out)
	return out, err
}

// Revoke changes tpd's deny list.
func (c *Client) Revoke(ctx context.Context, req RevokeRequest) (RevokeResponse, error) {
	var out RevokeResponse
	b, _ := json.Marshal(req)
	err := c.do(ctx, http.MethodPost, "/v1/revoke", b, &out)
	return out, err
}

// DenyList returns tpd's deny list.
func (c *Client) DenyList(ctx context.Context) ([]DenyEntry, error) {
	var out []DenyEntry
	err := c.do(ctx, http.MethodGet, "/v1/denylist", nil, &out)
	return out, err
}

// Shares lists the guest shares, oldest first, with their state.
func (c *Client) Shares(ctx context.Context) ([]Share, error) {
	var out []Share
	err := c.do(ctx, http.MethodGet, "/v1/shares", nil, &out)
	return out, err
}

// Users lists users and devices.
func (c *Client) Users(ctx context.Context) ([]users.UserInfo, error) {
	var out []users.UserInfo
	err := c.do(ctx, http.MethodGet, "/v1/users", nil, &out)
	return out, err
}

func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://tpd"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach tpd through %s (is `tpd serve` running with this --data-dir, and are you its user?): %w", c.Socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return &refusedError{msg: string(bytes.TrimSpace(data))}
	}
	return json.Unmarshal(data, out)
}

// refusedError is tpd's answer to a request it refused: its own sentence.
type refusedError struct{ msg string }

func (e *refusedError) Error() string { return "tpd refused: " + e.msg }
