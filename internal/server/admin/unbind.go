package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/users"
)

// UnbindRequest clears a user's binding to the identity provider's account
// (users.Store.UnbindUser).
type UnbindRequest struct {
	User string `json:"user"`
}

// UnbindResponse says what changed: the provider's subject the user was
// bound to ("" when it was bound to none, and nothing changed).
type UnbindResponse struct {
	User    string `json:"user"`
	Subject string `json:"subject,omitempty"`
}

// Summary is what `tpd users unbind` prints about res.
func (res UnbindResponse) Summary() string {
	if res.Subject == "" {
		return fmt.Sprintf("User %s is not bound to an account at the identity provider; nothing changed.\n", res.User)
	}
	return fmt.Sprintf("User %s was bound to the identity provider's account %q (its subject); that binding is cleared.\n"+
		"The next account that signs in as %s (dlogin --sso) binds it. Devices already enrolled keep the account that enrolled them;\n"+
		"revoke those of the previous person (tpd revoke --device %s@NAME; tpd users lists them).\n",
		res.User, res.Subject, res.User, res.User)
}

// unbind answers POST /v1/unbind.
func (s *Server) unbind(w http.ResponseWriter, r *http.Request) {
	var req UnbindRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		http.Error(w, "malformed request: "+err.Error(), http.StatusBadRequest)
		return
	}
	a := Act{Act: "unbind_user", Subject: req.User, Via: "admin socket", Result: "ok"}
	if !authz.ValidName(req.User) {
		err := fmt.Errorf("user %q: %w", req.User, users.ErrBadName)
		a.Result, a.Reason = "refused", err.Error()
		s.act(a)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	was, err := s.Users.UnbindUser(req.User)
	switch {
	case errors.Is(err, users.ErrNotFound):
		err = fmt.Errorf("there is no user %s; tpd users lists them", req.User)
		fallthrough
	case err != nil:
		a.Result, a.Reason = "refused", err.Error()
		s.act(a)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	case was == "":
		a.Result = "unchanged"
	default:
		a.Changed = []string{fmt.Sprintf("sso-subject: %q → none", was)}
	}
	s.act(a)
	if s.Logger != nil && was != "" {
		s.Logger.Info("user unbound from its account at the identity provider", "user", req.User, "subject", was)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(UnbindResponse{User: req.User, Subject: was})
}

// Unbind clears a user's binding to the identity provider's account.
func (c *Client) Unbind(ctx context.Context, user string) (UnbindResponse, error) {
	var out UnbindResponse
	b, _ := json.Marshal(UnbindRequest{User: user})
	err := c.do(ctx, http.MethodPost, "/v1/unbind", b, &out)
	return out, err
}
