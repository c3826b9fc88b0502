package tpd

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/policy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A public exposure the policy refuses: the refusal the agent gets (what tp
// expose prints), tpd's session line and its audit line name the name and the
// public port asked for, and the policy's reason. Bad inputs: tp expose --public
// PORT (and --public-sni) under the default policy, which allows alice to
// register names but not to expose them publicly; bob, whom it allows nothing;
// carol, whose public ports a deny_reason of the policy explains. tp once said
// "no policy rule allows alice@laptop to expose_public  port 20005" (an empty
// host) and, for bob, "... to listen game.rev.tp.internal port 0" (a port
// nobody asked for).
func TestPublicExposeRefusalNamesWhatWasAsked(t *testing.T) {
	t.Parallel()
	port := testnet.FreePort(t, "tcp")
	pol := policy.DefaultPolicy + `
allow if {
	input.action == "listen"
	input.identity.user in {"alice", "carol"}
}

deny_reason contains "public ports need the ops group; ask #infra" if {
	input.action == "expose_public"
	input.identity.user == "carol"
}
`
	log := &testlog.Buffer{}
	auditPath := ""
	d := serveDaemon(t, pol, func(c *config.Server) {
		c.PublicPorts = fmt.Sprint(port)
		c.AuditLog = filepath.Join(c.DataDir, "audit.jsonl")
		auditPath = c.AuditLog
	}, slog.New(slog.NewTextHandler(log, nil)))
	url := d.cfg.PublicURL()
	local := testnet.Upper(t)
	game := []clients.Exposed{{Name: "game", Local: local, PublicPort: port}}
	asked := fmt.Sprintf("expose game on public TCP port %d", port)
	for _, tc := range []struct {
		id, transport string
		exposed       []clients.Exposed
		want          string // the whole reason the agent is given
	}{
		{"alice@laptop", clients.TransportTLS, game, "no policy rule allows alice@laptop to " + asked},
		{"alice@phone", clients.TransportQUIC, game, "no policy rule allows alice@phone to " + asked},
		{"alice@tablet", clients.TransportTLS, []clients.Exposed{{Name: "blog", Local: local, PublicSNI: "blog.example.test"}},
			"no policy rule allows alice@tablet to expose blog by TLS server name blog.example.test"},
		{"bob@laptop", clients.TransportTLS, game, "cannot " + asked + ": no policy rule allows bob@laptop to listen as game.rev.tp.internal"},
		{"carol@laptop", clients.TransportQUIC, game, "cannot " + asked + ": public ports need the ops group; ask #infra"},
	} {
		t.Run(tc.id+" over "+tc.transport, func(t *testing.T) {
			user, device, _ := strings.Cut(tc.id, "@")
			c, _, _ := enrollClient(t, d, url, user, device)
			_, err := runAgent(t, c, tc.transport, tc.exposed, nil)
			wantRefused(t, err, wire.CodePolicyDenied, tc.want)
			if msg := err.Error(); msg != "denied by policy: "+tc.want {
				t.Errorf("the agent was told %q; want %q", msg, "denied by policy: "+tc.want)
			}
			if strings.Contains(err.Error(), "port 0") || strings.Contains(err.Error(), "expose_public") {
				t.Errorf("the refusal names a port or an action nobody asked for: %v", err)
			}

			dest := "listen " + tc.exposed[0].Name + ".rev.tp.internal,"
			if p := tc.exposed[0].PublicPort; p != 0 {
				dest += fmt.Sprintf("tcp/%d", p)
			} else {
				dest += "sni/" + tc.exposed[0].PublicSNI
			}
			id := tc.id
			line := ""
			poll(t, "tpd's session line of "+id+"'s refused exposure", func() bool {
				for _, l := range strings.Split(log.String(), "\n") {
					if strings.Contains(l, `msg="proxy session"`) && strings.Contains(l, "identity="+id) &&
						strings.Contains(l, `dest="`+dest+`"`) {
						line = l
					}
				}
				return line != ""
			})
			if !strings.Contains(line, `end="policy_denied: `+tc.want+`"`) {
				t.Errorf("tpd's session line does not say %q:\n%s", tc.want, line)
			}
			audit := waitAudit(t, auditPath, "the audit line of "+id+"'s refused exposure", func(l map[string]any) bool {
				return l["identity"] == id && l["destination"] == dest
			})
			if audit["decision"] != "deny" || audit["end_reason"] != "policy_denied: "+tc.want {
				t.Errorf("the audit line %v: want decision deny and the end reason %q", audit, "policy_denied: "+tc.want)
			}
		})
	}
}
