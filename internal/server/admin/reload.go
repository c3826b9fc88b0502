package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
)

// ReloadResponse says what a reload of tpd.yaml put in force.
type ReloadResponse struct {
	// Changed lists each setting whose value changed, in the order of
	// tpd.yaml's keys and in its spelling: "hello-timeout: 10s → 3s",
	// "public-ports: \"\" → 20000-20100", one line per site added, removed or
	// changed ("sites: added {name: www.example.org, root: /srv/www}").
	Changed []string `json:"changed"`
	// PolicyRevision is the policy in force after the reload.
	PolicyRevision string `json:"policy_revision"`
}

// Reloader re-reads tpd's configuration; tpd's Daemon implements it. A refusal
// is an error whose text says why, for a person; the running configuration
// stays then.
type Reloader interface {
	Reload(ctx context.Context) (ReloadResponse, error)
}

func (s *Server) reload(w http.ResponseWriter, r *http.Request) {
	if s.Reloader == nil {
		http.Error(w, "this tpd cannot reload its configuration", http.StatusNotImplemented)
		return
	}
	res, err := s.Reloader.Reload(r.Context())
	if err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(res)
}

// Reload asks tpd to re-read tpd.yaml and apply it.
func (c *Client) Reload(ctx context.Context) (ReloadResponse, error) {
	var out ReloadResponse
	err := c.do(ctx, http.MethodPost, "/v1/reload", nil, &out)
	if re := (*refusedError)(nil); errors.As(err, &re) {
		return out, fmt.Errorf("tpd kept its running configuration: %s; fix that and run tpd reload again", re.msg)
	}
	return out, err
}
