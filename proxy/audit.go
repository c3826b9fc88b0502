package proxy

// The audit hook: one SessionRecord per session, handed to Config.OnSessionEnd
// when the session's log line is written. The proxy knows nothing of files or
// formats; tpd writes the records as JSON lines (internal/server/tpd/audit.go).

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/tp-proxy/tp/proxy/reverse"
	"github.com/tp-proxy/tp/proxy/wire"
)

// SessionRecord describes one session after it ended. Every string a client
// controls (the destination it asked for, its names) is copied as it came: the
// consumer must escape it (encoding/json does).
type SessionRecord struct {
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
	// Remote is the client's address; for a public session the public client's.
	Remote string `json:"remote"`
	// Identity is the device ID (user@device) of the certificate; empty for a
	// public session (whose client has none) and for a refused certificate.
	Identity string `json:"identity,omitempty"`
	User     string `json:"user,omitempty"`
	// Serial is the client certificate's serial number in lower-case hex.
	Serial string `json:"serial,omitempty"`
	// Transport is "tls" or "quic" for proxy sessions, "tcp" or "udp" for
	// public sessions.
	Transport string `json:"transport"`
	// Action is the request: dial, dial_udp, listen, accept, why, or public for
	// a session of a public client on an exposure; empty when no hello was read.
	Action string `json:"action,omitempty"`
	// Destination is what the client asked for (host:port as canonicalised, the
	// names of a listen, the session of an accept, the exposure of a public
	// session); Dialed is the address actually connected, or the agent.
	Destination string `json:"destination,omitempty"`
	Dialed      string `json:"dialed,omitempty"`
	// Decision is "allow", "deny" or empty when the policy was not asked;
	// PolicyRevision the revision that decided (empty when TP decided alone).
	Decision       string `json:"decision,omitempty"`
	PolicyRevision string `json:"policy_revision,omitempty"`
	// BytesUp counts client→destination, BytesDown destination→client.
	BytesUp   int64 `json:"bytes_up"`
	BytesDown int64 `json:"bytes_down"`
	// EndedBy is who ended the session: "client", "destination", "agent" or
	// "server"; empty after a clean end, when both sides finished sending.
	EndedBy string `json:"ended_by,omitempty"`
	// EndCode is "closed" after a clean end, the refusal's code (PROTOCOL.md)
	// when the request was refused, or the abort's name (shutdown, revoked,
	// peer_reset …). EndReason says why in a sentence.
	EndCode   string `json:"end_code"`
	EndReason string `json:"end_reason,omitempty"`
}

// auditState is what a session's record needs beyond the log line's fields.
type auditState struct {
	transport string
	action    string
	revision  string
	err       error // why the relay or control session ended; nil after a clean end
}

// actionOf names the request of hello.
func actionOf(h wire.ClientHello) string {
	if h.Op == wire.OpDial {
		return dialAction(h.Net)
	}
	return h.Op
}

func (s *Server) auditSession(ss *session) {
	if s.cfg.OnSessionEnd == nil {
		return
	}
	r := SessionRecord{
		Start: ss.start, End: time.Now(), Remote: ss.remote,
		Identity: ss.id.DeviceID, User: ss.id.User, Serial: ss.id.Serial,
		Transport: ss.audit.transport, Action: ss.audit.action,
		Destination: ss.dest, Dialed: ss.upstream,
		Decision: ss.decision, PolicyRevision: ss.audit.revision,
		BytesUp: ss.up, BytesDown: ss.down,
		EndCode: "closed", EndReason: ss.end,
	}
	switch {
	case ss.code != "": // refused
		r.EndedBy, r.EndCode = "server", ss.code
	case ss.audit.err != nil && ss.audit.action == wire.OpListen:
		r.EndedBy, r.EndCode = listenEnd(ss.audit.err)
	case ss.audit.err != nil:
		e := ss.endOf(ss.audit.err)
		r.EndedBy, r.EndCode, r.EndReason = e.By, e.Code, e.Reason
	}
	s.cfg.OnSessionEnd(r)
}

// listenEnd says who ended an agent's control session and how (reverse.go).
func listenEnd(cause error) (by, code string) {
	var rev *wire.RevokedError
	var ee *wire.EndError
	var cv *controlViolation
	switch {
	case errors.Is(cause, reverse.ErrReplaced):
		return "server", "replaced"
	case errors.As(cause, &rev):
		return "server", wire.EndName(rev.Code())
	case errors.As(cause, &ee):
		return ee.By, wire.EndName(ee.Code)
	case errors.Is(cause, context.Canceled):
		return "server", wire.EndShutdown
	case errors.Is(cause, reverse.ErrUnregistered):
		return "client", "unregister"
	case errors.As(cause, &cv):
		return "client", wire.CodeBadRequest
	}
	return "client", wire.EndPeerReset // the control stream failed or broke the protocol
}

// auditPublic records a public client's session on an exposure.
// agent is the agent as the log line names it, empty when none was online.
func (s *Server) auditPublic(start time.Time, remote, network, key, agent string, up, down int64, end string) {
	if s.cfg.OnSessionEnd == nil {
		return
	}
	r := SessionRecord{
		Start: start, End: time.Now(), Remote: remote, Transport: network, Action: "public",
		Destination: reverse.DescribeKey(key), BytesUp: up, BytesDown: down,
		EndCode: "closed", EndReason: end,
	}
	if agent != "" {
		r.Dialed = "agent " + agent
	}
	if strings.HasPrefix(end, "refused: ") {
		r.EndedBy, r.EndCode = "server", "refused"
	}
	s.cfg.OnSessionEnd(r)
}
