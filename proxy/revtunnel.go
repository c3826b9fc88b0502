package proxy

// The server side of draft-kazuho-httpbis-reverse-tunnel-00 (docs/HTTP.md §2):
// a device behind NAT opens a reverse tunnel to a proxy name of TP, and TP then
// acts as the HTTP client on it. Two kinds of tunnel URI:
//
//   - /.well-known/tp/reverse-http/LABEL: the tunnel carries HTTP for the
//     reverse name LABEL.<reverse-zone> (action expose_http). TP sends the
//     requests of the name's website down it (ReverseHTTP): one HTTP/1.1
//     connection per tunnel (the draft's accept semantics; the waiting tunnels
//     are TP's connection pool for the name), or many requests over one tunnel
//     that chose h2.
//   - /.well-known/listen-tcp/ADDR/PORT/ (and the draft's other spelling,
//     /.well-known/reverse/tcp/ADDR/PORT/): TP relays the connections of its
//     public TCP port PORT (public-ports, action expose_public). Accept
//     semantics: each tunnel request waits (100 Continue) until a connection
//     arrives, is answered with a Forwarded field, and then carries that
//     connection's bytes. Bind semantics (the slides' alternative; the tunnel
//     chose h2): TP sends a CONNECT request on the tunnel per connection.
//
// Establishment: HTTP/1.1 GET with Upgrade: reverse (101), HTTP/2 extended
// CONNECT (RFC 8441) and HTTP/3 extended CONNECT (RFC 9220) with :protocol
// reverse (200). The tunnels' holder in the reverse registry is a reverseAgent
// whose open takes a tunnel (revtunnel_pool.go).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// ReverseTunnelOptions bound the reverse tunnels of the draft (revtunnel.go).
type ReverseTunnelOptions struct {
	// MaxPerName bounds the tunnels (waiting or in use) of one name or public
	// port. Default 32.
	MaxPerName int
	// MaxPerIdentity bounds the tunnels of one device identity over all its
	// names. Default 128.
	MaxPerIdentity int
	// IdleTimeout closes a tunnel no request used for so long (a waiting HTTP
	// tunnel, an idle h2 tunnel, an idle HTTP/1.1 connection). Default 2m.
	IdleTimeout time.Duration
	// ListenWait is how long a listen-tcp tunnel request waits for a
	// connection before TP answers 204 (No Content), as the draft says; while
	// it waits TP sends 100 (Continue) every ListenWait/4. Default 60s.
	ListenWait time.Duration
	// MaxHeaderBytes bounds the response header the app sends back through a
	// tunnel. Default 64 KiB.
	MaxHeaderBytes int
}

func (o ReverseTunnelOptions) withDefaults() ReverseTunnelOptions {
	if o.MaxPerName <= 0 {
		o.MaxPerName = 32
	}
	if o.MaxPerIdentity <= 0 {
		o.MaxPerIdentity = 128
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 2 * time.Minute
	}
	if o.ListenWait <= 0 {
		o.ListenWait = 60 * time.Second
	}
	if o.MaxHeaderBytes <= 0 {
		o.MaxHeaderBytes = 64 << 10
	}
	return o
}

// Tunnel URI prefixes.
const (
	// ReverseHTTPPath + LABEL is the tunnel URI of an HTTP app for reverse name
	// LABEL.<reverse-zone>.
	ReverseHTTPPath = "/.well-known/tp/reverse-http/"
	// ListenTCPPath + ADDR/PORT/ is the draft's TCP relay URI (listen-tcp well-known
	// URI of its IANA section and figure); reverseTCPPath is the spelling of its
	// URI template section, accepted too.
	ListenTCPPath  = "/.well-known/listen-tcp/"
	reverseTCPPath = "/.well-known/reverse/tcp/"
	upgradeToken   = "reverse"
)

// IsReverseTunnel reports whether r asks for a reverse tunnel: an HTTP/1.1
// Upgrade to "reverse", or an extended CONNECT with :protocol "reverse" over h2
// or h3. The proxy-name router sends such requests to ServeReverseTunnel.
func IsReverseTunnel(r *http.Request) bool {
	if r.ProtoMajor == 1 {
		return httpguts.HeaderValuesContainsToken(r.Header["Upgrade"], upgradeToken)
	}
	return r.Method == http.MethodConnect && strings.EqualFold(extendedProtocol(r), upgradeToken)
}

// extendedProtocol is the :protocol of an extended CONNECT: net/http's h2
// server keeps it as the header ":protocol", quic-go's h3 server as r.Proto.
func extendedProtocol(r *http.Request) string {
	if p := r.Header.Get(":protocol"); p != "" {
		return p
	}
	if r.ProtoMajor == 3 || !strings.HasPrefix(r.Proto, "HTTP/") {
		return r.Proto
	}
	return ""
}

// tunnelTarget is what a tunnel URI names.
type tunnelTarget struct {
	label string // HTTP app: the reverse label
	full  string // its full name
	port  int    // listen-tcp: the public port
	addr  string // listen-tcp: the listen address as the URI gave it
	// devicesOnly: the exposer lets only enrolled devices reach the HTTP app
	// (request field TP-Access: devices).
	devicesOnly bool
}

// AccessField is the tunnel request's header field by which an exposer chooses
// who may reach its HTTP app: "anyone" (the default) or "devices" (enrolled
// devices only; tpd's website then requires a device certificate).
const AccessField = "TP-Access"

func (t tunnelTarget) key() string {
	if t.port != 0 {
		return "tcp/" + strconv.Itoa(t.port)
	}
	return t.full
}

// refusal is an answer to a tunnel request that is not a tunnel.
type refusal struct {
	status int
	code   string
	reason string
}

func (e *refusal) Error() string { return e.reason }

func refuse(status int, code, format string, args ...any) *refusal {
	return &refusal{status: status, code: code, reason: fmt.Sprintf(format, args...)}
}

// parseTarget reads the tunnel URI's path.
func (s *Server) parseTarget(path string) (tunnelTarget, *refusal) {
	zone := s.rev.opts.Zone
	switch {
	case strings.HasPrefix(path, ReverseHTTPPath):
		label := strings.ToLower(strings.TrimSuffix(path[len(ReverseHTTPPath):], "/"))
		if !validLabel(label) {
			return tunnelTarget{}, refuse(http.StatusBadRequest, wire.CodeBadRequest,
				"%q is no reverse name: the tunnel URI is %sLABEL, LABEL one DNS label (letters, digits, hyphens; at most 63)", label, ReverseHTTPPath)
		}
		return tunnelTarget{label: label, full: label + "." + zone}, nil
	case strings.HasPrefix(path, ListenTCPPath), strings.HasPrefix(path, reverseTCPPath):
		rest := strings.TrimPrefix(strings.TrimPrefix(path, ListenTCPPath), reverseTCPPath)
		parts := strings.Split(strings.TrimSuffix(rest, "/"), "/")
		if len(parts) != 2 {
			return tunnelTarget{}, refuse(http.StatusBadRequest, wire.CodeBadRequest,
				"the TCP relay URI is %s{listen_host}/{listen_port}/; got %q", ListenTCPPath, path)
		}
		port, err := strconv.Atoi(parts[1])
		if err != nil || port < 1 || port > 65535 {
			return tunnelTarget{}, refuse(http.StatusBadRequest, wire.CodeBadRequest, "listen_port %q is no TCP port (1-65535)", parts[1])
		}
		if !s.listenHostOK(parts[0]) {
			host := s.rev.opts.PublicHost
			if host == "" {
				host = "0.0.0.0 or ::"
			}
			return tunnelTarget{}, refuse(http.StatusBadRequest, wire.CodePublicRefused,
				"TP opens public ports on one address, %s; ask for it or for a wildcard address (0.0.0.0, ::), not %q", host, parts[0])
		}
		return tunnelTarget{port: port, addr: parts[0]}, nil
	}
	return tunnelTarget{}, refuse(http.StatusNotFound, wire.CodeBadRequest,
		"no reverse tunnel at %q: TP's tunnel URIs are %sLABEL (HTTP) and %s{listen_host}/{listen_port}/ (TCP relay)", path, ReverseHTTPPath, ListenTCPPath)
}

// listenHostOK reports whether listen_host names where TP's public ports listen:
// a wildcard address, or PublicHost itself.
func (s *Server) listenHostOK(h string) bool {
	h = strings.Trim(h, "[]")
	if h == "*" {
		return true
	}
	if a, err := netip.ParseAddr(h); err == nil && a.IsUnspecified() {
		return true
	}
	return h != "" && h == strings.Trim(s.rev.opts.PublicHost, "[]")
}

func validLabel(l string) bool {
	if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
		return false
	}
	for _, c := range l {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// parseALPN reads the ALPN header field (RFC 7639): comma-separated,
// percent-encoded protocol identifiers. ok is false when the field is absent.
func parseALPN(h http.Header) (ids []string, ok bool, err error) {
	vals := h.Values("ALPN")
	if len(vals) == 0 {
		return nil, false, nil
	}
	for _, v := range vals {
		for _, tok := range strings.Split(v, ",") {
			tok = strings.TrimSpace(tok)
			if tok == "" {
				continue
			}
			id, err := pctDecode(tok)
			if err != nil {
				return nil, true, fmt.Errorf("ALPN identifier %q: %w", tok, err)
			}
			ids = append(ids, id)
		}
	}
	return ids, true, nil
}

func pctDecode(s string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b.WriteByte(s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", errors.New("truncated percent-encoding")
		}
		v, err := strconv.ParseUint(s[i+1:i+3], 16, 8)
		if err != nil {
			return "", errors.New("bad percent-encoding")
		}
		b.WriteByte(byte(v))
		i += 2
	}
	return b.String(), nil
}

// alpnToken encodes an identifier for the Selected-ALPN field (RFC 7639 §2.1).
func alpnToken(id string) string {
	var b strings.Builder
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c == '%' || c <= ' ' || c >= 0x7f || strings.IndexByte("()<>@,;:\\\"/[]?={}", c) >= 0 {
			fmt.Fprintf(&b, "%%%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// ServeReverseTunnel serves a request for a reverse tunnel on a proxy name
// (IsReverseTunnel). r.TLS must carry the verified device certificate: the
// request is identified like a tp session. A refusal is an HTTP status with
// the reason in the body; a tunnel lives until its peer, its idle timeout, its
// certificate's expiry, a policy re-check or Shutdown ends it.
func (s *Server) ServeReverseTunnel(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	t := &tunnelRec{start: start, remote: r.RemoteAddr, version: r.Proto}
	if r.ProtoMajor >= 2 {
		t.version = "HTTP/" + strconv.Itoa(r.ProtoMajor)
	}
	var herr *refusal
	// Deferred: an aborted h2/h3 tunnel ends its handler with a panic
	// (http.ErrAbortHandler, which resets the stream); it is logged too.
	defer func() { s.logTunnel(r, t, herr) }()
	herr = s.serveReverseTunnel(w, r, t)
	if herr != nil {
		t.end = "refused: " + herr.reason
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Tp-Refusal", herr.code)
		if r.ProtoMajor == 1 {
			w.Header().Set("Connection", "close")
		}
		w.WriteHeader(herr.status)
		_, _ = fmt.Fprintln(w, herr.reason)
	}
}

// logTunnel writes a tunnel's log line and audit record.
func (s *Server) logTunnel(r *http.Request, t *tunnelRec, herr *refusal) {
	endCode := "closed"
	if herr != nil {
		endCode = herr.code
	}
	if t.end == "" { // its handler ended in a panic: the stream was reset
		t.end, endCode = "aborted", "peer_reset"
	}
	s.log.LogAttrs(r.Context(), slog.LevelInfo, "reverse tunnel",
		slog.String("identity", t.id.String()), slog.String("remote", t.remote), slog.String("target", t.target),
		slog.String("http", t.version), slog.String("alpn", t.alpn), slog.String("semantics", t.semantics),
		slog.String("decision", t.decision), slog.Int("connections", int(t.uses.Load())),
		slog.Duration("duration", time.Since(t.start)), slog.String("end", t.end))
	if s.cfg.OnSessionEnd != nil {
		rec := SessionRecord{Start: t.start, End: time.Now(), Remote: t.remote, Identity: t.id.DeviceID, User: t.id.User,
			Serial: t.id.Serial, Transport: transportOf(r), Action: t.action, Destination: t.target,
			Dialed: "reverse tunnel (" + t.version + ", " + t.semantics + ")", Decision: t.decision,
			PolicyRevision: t.revision, EndCode: endCode, EndReason: t.end}
		if herr != nil {
			rec.EndedBy = "server"
		}
		s.cfg.OnSessionEnd(rec)
	}
}

func (s *Server) serveReverseTunnel(w http.ResponseWriter, r *http.Request, t *tunnelRec) *refusal {
	if s.rev == nil {
		return refuse(http.StatusNotFound, wire.CodeReverseDisabled, "this TP server has no reverse zone, so it holds no reverse tunnels; the administrator sets reverse-zone in tpd.yaml")
	}
	if !IsReverseTunnel(r) {
		return refuse(http.StatusBadRequest, wire.CodeBadRequest, "not a reverse tunnel request: send GET with Upgrade: reverse (HTTP/1.1) or CONNECT with :protocol reverse (h2, h3)")
	}
	if r.ProtoMajor == 1 {
		if r.Method != http.MethodGet {
			return refuse(http.StatusMethodNotAllowed, wire.CodeBadRequest, "a reverse tunnel over HTTP/1.1 is a GET request (draft-kazuho-httpbis-reverse-tunnel, section 3.1), not %s", r.Method)
		}
		if !httpguts.HeaderValuesContainsToken(r.Header["Connection"], "upgrade") {
			return refuse(http.StatusBadRequest, wire.CodeBadRequest, "Upgrade: reverse needs Connection: upgrade")
		}
	}
	target, herr := s.parseTarget(r.URL.Path)
	if herr != nil {
		return herr
	}
	switch a := strings.ToLower(strings.TrimSpace(r.Header.Get(AccessField))); a {
	case "", "anyone":
	case "devices":
		if target.port != 0 {
			return refuse(http.StatusBadRequest, wire.CodeBadRequest, "%s: devices applies to HTTP apps; a public TCP port has no way to check a device certificate", AccessField)
		}
		target.devicesOnly = true
	default:
		return refuse(http.StatusBadRequest, wire.CodeBadRequest, "%s: %q is neither anyone nor devices", AccessField, a)
	}
	t.target = target.key()
	if target.port != 0 {
		t.target = "listen-tcp " + target.addr + ":" + strconv.Itoa(target.port)
	}
	id, herr := s.identifyHTTP(r)
	if herr != nil {
		return herr
	}
	t.id = id
	offered, hasALPN, err := parseALPN(r.Header)
	if err != nil {
		return refuse(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
	}
	alpn := chooseALPN(target, offered, hasALPN)
	if alpn == "" && target.port == 0 {
		return refuse(http.StatusBadRequest, wire.CodeBadRequest, "TP speaks h2 or http/1.1 inside an HTTP reverse tunnel; the ALPN field offered only %s", strings.Join(offered, ", "))
	}
	t.alpn = alpn

	req := authz.Request{
		Action:      authz.ActionExposeHTTP,
		Identity:    id,
		Destination: authz.Destination{Host: target.full, Network: "tcp", Reverse: target.label},
		Source:      authz.Source{Address: r.RemoteAddr, Transport: transportOf(r)},
		Time:        time.Now(),
	}
	if target.port != 0 {
		o := s.rev.opts
		if o.PublicPorts == nil || !o.PublicPorts("tcp", target.port) {
			return refuse(http.StatusForbidden, wire.CodePublicRefused, "this TP server does not open public TCP port %d; its administrator lists the ports it may open in public-ports (tpd.yaml)", target.port)
		}
		req.Action = authz.ActionExposePublic
		req.Destination = authz.Destination{Network: "tcp", Port: target.port}
	}
	ss := &session{}
	t.action = req.Action
	derr := s.decide(r.Context(), ss, req, "no policy rule allows "+id.String()+" to "+req.Asked())
	t.revision = ss.audit.revision
	if herr := derr; herr != nil {
		t.decision = "deny"
		status := http.StatusForbidden
		if herr.Code == wire.CodePolicyError {
			status = http.StatusServiceUnavailable
		}
		return refuse(status, herr.Code, "%s", herr.Reason)
	}
	t.decision = "allow"

	h, tun, herr := s.rev.tunnels.join(s, target, id, alpn)
	if herr != nil {
		return herr
	}
	defer s.rev.tunnels.leave(s, h, tun)
	if r.ProtoMajor == 1 {
		// A hijacked connection leaves net/http's (and the proxy name's)
		// accounting: the tunnel holds a slot of MaxConns of its own.
		if !s.acquire() {
			return refuse(http.StatusServiceUnavailable, CodeTooManySessions, "the TP server has as many connections as it allows; try again later")
		}
		defer s.release()
	}

	// The tunnel lives within the holder (which a newer holder, a revocation
	// or Shutdown ends), the certificate and the server's forced stop.
	ctx, cancel := context.WithDeadlineCause(h.ctx, id.NotAfter, wire.ErrCertExpired)
	defer cancel()
	ctx, end := context.WithCancelCause(ctx)
	defer end(nil)
	stopForce := context.AfterFunc(s.force, func() { end(wire.ErrShutdown) })
	defer stopForce()
	defer s.sessions.add(&liveSession{cs: *r.TLS, req: req, revoke: end})()
	tun.rec = t

	if target.port != 0 {
		s.serveListenTunnel(ctx, w, r, h, tun, alpn)
	} else {
		s.serveHTTPTunnel(ctx, w, r, h, tun, alpn)
	}
	if t.end == "" {
		t.end = "closed"
		if c := context.Cause(ctx); c != nil {
			t.end = c.Error()
		}
	}
	return nil
}

// chooseALPN picks what runs inside the tunnel. An HTTP app's tunnel carries
// h2 when offered, else http/1.1; without an ALPN field TP assumes http/1.1
// (and sends no Selected-ALPN, as the draft requires). A listen-tcp tunnel
// that offers h2 binds (one CONNECT per connection); otherwise it relays bytes.
func chooseALPN(t tunnelTarget, offered []string, hasALPN bool) string {
	has := func(p string) bool {
		for _, o := range offered {
			if o == p {
				return true
			}
		}
		return false
	}
	switch {
	case t.port != 0 && has("h2"):
		return "h2"
	case t.port != 0:
		return ""
	case !hasALPN:
		return "http/1.1"
	case has("h2"):
		return "h2"
	case has("http/1.1"):
		return "http/1.1"
	}
	return ""
}

func transportOf(r *http.Request) string {
	if r.ProtoMajor == 3 {
		return "quic"
	}
	return "tls"
}

// identifyHTTP identifies the device certificate of a request on a proxy name
// as establish does a tp session's.
func (s *Server) identifyHTTP(r *http.Request) (authz.Identity, *refusal) {
	cs := r.TLS
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return authz.Identity{}, refuse(http.StatusUnauthorized, wire.CodeUnauthenticated, "a reverse tunnel needs a verified TP device certificate")
	}
	id, err := s.cfg.Identify(*cs)
	if err != nil {
		return authz.Identity{}, refuse(http.StatusForbidden, wire.CodeUnauthenticated, "client certificate not accepted: %v", err)
	}
	if leafNA := cs.PeerCertificates[0].NotAfter; id.NotAfter.IsZero() || leafNA.Before(id.NotAfter) {
		id.NotAfter = leafNA
	}
	if !time.Now().Before(id.NotAfter) {
		return authz.Identity{}, refuse(http.StatusForbidden, wire.CodeUnauthenticated, "client certificate expired at %s", id.NotAfter.UTC().Format(time.RFC3339))
	}
	return id, nil
}

// establish answers the tunnel request with success (101 over HTTP/1.1, 200
// over h2/h3) and extra header fields, and returns the tunnel's byte stream.
func establishTunnel(w http.ResponseWriter, r *http.Request, hj *hijacked, extra http.Header) (tunnelConn, error) {
	if r.ProtoMajor == 1 {
		var err error
		if hj == nil {
			if hj, err = hijack(w); err != nil {
				return nil, err
			}
		}
		var b strings.Builder
		b.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: reverse\r\n")
		_ = extra.Write(&b)
		b.WriteString("\r\n")
		_ = hj.conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
		if _, err := hj.conn.Write([]byte(b.String())); err != nil {
			_ = hj.conn.Close()
			return nil, err
		}
		_ = hj.conn.SetWriteDeadline(time.Time{})
		return hj.tunnel(), nil
	}
	for k, v := range extra {
		w.Header()[k] = v
	}
	if r.ProtoMajor == 3 {
		// quic-go's server hands the request stream over, which can end TP's
		// direction (FIN) while the service's goes on: half-close both ways.
		st, err := h3Tunnel(w, r)
		if err != nil {
			return nil, err
		}
		return &h3TunnelConn{h3Stream: st.(*h3Stream), done: make(chan struct{})}, nil
	}
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		return nil, err
	}
	return newStreamConn(w, r), nil
}

// tunnelRec is the record of one tunnel, logged once at its end.
type tunnelRec struct {
	start     time.Time
	remote    string
	id        authz.Identity
	target    string
	version   string
	alpn      string
	semantics string
	decision  string
	action    string
	revision  string
	end       string
	uses      atomicCount
}
