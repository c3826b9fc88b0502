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
// reverse (200). The tunnels' holder in the reverse registry is a reverse.Agent
// whose open takes a tunnel (revtunnel_pool.go).

import (
	"context"
	"fmt"
	"github.com/quic-go/quic-go"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/tp-proxy/tp/proxy/reverse"
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
	var herr *reverse.Refusal
	// Deferred: an aborted h2/h3 tunnel ends its handler with a panic
	// (http.ErrAbortHandler, which resets the stream); it is logged too.
	defer func() { s.logTunnel(r, t, herr) }()
	herr = s.serveReverseTunnel(w, r, t)
	if herr != nil {
		t.end = "refused: " + herr.Reason
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Tp-Refusal", herr.Code)
		if r.ProtoMajor == 1 {
			w.Header().Set("Connection", "close")
		}
		w.WriteHeader(herr.Status)
		_, _ = fmt.Fprintln(w, herr.Reason)
	}
}

// logTunnel writes a tunnel's log line and audit record.
func (s *Server) logTunnel(r *http.Request, t *tunnelRec, herr *reverse.Refusal) {
	endCode := "closed"
	if herr != nil {
		endCode = herr.Code
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

func (s *Server) serveReverseTunnel(w http.ResponseWriter, r *http.Request, t *tunnelRec) *reverse.Refusal {
	if s.rev == nil {
		return reverse.Refuse(http.StatusNotFound, wire.CodeReverseDisabled, "this TP server has no reverse zone, so it holds no reverse tunnels; the administrator sets reverse-zone in tpd.yaml")
	}
	if !reverse.IsReverseTunnel(r) {
		return reverse.Refuse(http.StatusBadRequest, wire.CodeBadRequest, "not a reverse tunnel request: send GET with Upgrade: reverse (HTTP/1.1) or CONNECT with :protocol reverse (h2, h3)")
	}
	if r.ProtoMajor == 1 {
		if r.Method != http.MethodGet {
			return reverse.Refuse(http.StatusMethodNotAllowed, wire.CodeBadRequest, "a reverse tunnel over HTTP/1.1 is a GET request (draft-kazuho-httpbis-reverse-tunnel, section 3.1), not %s", r.Method)
		}
		if !httpguts.HeaderValuesContainsToken(r.Header["Connection"], "upgrade") {
			return reverse.Refuse(http.StatusBadRequest, wire.CodeBadRequest, "Upgrade: reverse needs Connection: upgrade")
		}
	}
	target, herr := reverse.ParseTarget(r.URL.Path, s.rev.opts.Zone, s.rev.opts.PublicHost)
	if herr != nil {
		return herr
	}
	switch a := strings.ToLower(strings.TrimSpace(r.Header.Get(reverse.AccessField))); a {
	case "", "anyone":
	case "devices":
		if target.Port != 0 {
			return reverse.Refuse(http.StatusBadRequest, wire.CodeBadRequest, "%s: devices applies to HTTP apps; a public TCP port has no way to check a device certificate", reverse.AccessField)
		}
		target.DevicesOnly = true
	default:
		return reverse.Refuse(http.StatusBadRequest, wire.CodeBadRequest, "%s: %q is neither anyone nor devices", reverse.AccessField, a)
	}
	t.target = target.Key()
	if target.Port != 0 {
		t.target = "listen-tcp " + target.Addr + ":" + strconv.Itoa(target.Port)
	}
	id, herr := s.identifyHTTP(r)
	if herr != nil {
		return herr
	}
	t.id = id
	offered, hasALPN, err := reverse.ParseALPN(r.Header)
	if err != nil {
		return reverse.Refuse(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
	}
	alpn := reverse.ChooseALPN(target, offered, hasALPN)
	if alpn == "" && target.Port == 0 {
		return reverse.Refuse(http.StatusBadRequest, wire.CodeBadRequest, "TP speaks h2 or http/1.1 inside an HTTP reverse tunnel; the ALPN field offered only %s", strings.Join(offered, ", "))
	}
	t.alpn = alpn

	req := authz.Request{
		Action:      authz.ActionExposeHTTP,
		Identity:    id,
		Destination: authz.Destination{Host: target.Full, Network: "tcp", Reverse: target.Label},
		Source:      authz.Source{Address: r.RemoteAddr, Transport: transportOf(r)},
		Time:        time.Now(),
	}
	if target.Port != 0 {
		o := s.rev.opts
		if o.PublicPorts == nil || !o.PublicPorts("tcp", target.Port) {
			return reverse.Refuse(http.StatusForbidden, wire.CodePublicRefused, "this TP server does not open public TCP port %d; its administrator lists the ports it may open in public-ports (tpd.yaml)", target.Port)
		}
		req.Action = authz.ActionExposePublic
		req.Destination = authz.Destination{Network: "tcp", Port: target.Port}
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
		return reverse.Refuse(status, herr.Code, "%s", herr.Reason)
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
			return reverse.Refuse(http.StatusServiceUnavailable, CodeTooManySessions, "the TP server has as many connections as it allows; try again later")
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

	if target.Port != 0 {
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

func transportOf(r *http.Request) string {
	if r.ProtoMajor == 3 {
		return "quic"
	}
	return "tls"
}

// identifyHTTP identifies the device certificate of a request on a proxy name
// as establish does a tp session's.
func (s *Server) identifyHTTP(r *http.Request) (authz.Identity, *reverse.Refusal) {
	cs := r.TLS
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return authz.Identity{}, reverse.Refuse(http.StatusUnauthorized, wire.CodeUnauthenticated, "a reverse tunnel needs a verified TP device certificate")
	}
	id, err := s.cfg.Identify(*cs)
	if err != nil {
		return authz.Identity{}, reverse.Refuse(http.StatusForbidden, wire.CodeUnauthenticated, "client certificate not accepted: %v", err)
	}
	if leafNA := cs.PeerCertificates[0].NotAfter; id.NotAfter.IsZero() || leafNA.Before(id.NotAfter) {
		id.NotAfter = leafNA
	}
	if !time.Now().Before(id.NotAfter) {
		return authz.Identity{}, reverse.Refuse(http.StatusForbidden, wire.CodeUnauthenticated, "client certificate expired at %s", id.NotAfter.UTC().Format(time.RFC3339))
	}
	return id, nil
}

// establish answers the tunnel request with success (101 over HTTP/1.1, 200
// over h2/h3) and extra header fields, and returns the tunnel's byte stream.
func establishTunnel(w http.ResponseWriter, r *http.Request, hj *reverse.Hijacked, extra http.Header) (reverse.TunnelConn, error) {
	if r.ProtoMajor == 1 {
		var err error
		if hj == nil {
			if hj, err = reverse.Hijack(w); err != nil {
				return nil, err
			}
		}
		var b strings.Builder
		b.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: reverse\r\n")
		_ = extra.Write(&b)
		b.WriteString("\r\n")
		_ = hj.Conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
		if _, err := hj.Conn.Write([]byte(b.String())); err != nil {
			_ = hj.Conn.Close()
			return nil, err
		}
		_ = hj.Conn.SetWriteDeadline(time.Time{})
		return hj.Tunnel(), nil
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
	return reverse.NewStreamConn(w, r), nil
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

type atomicCount struct{ atomic.Int64 }

// h3TunnelConn is an h3 extended CONNECT stream taken over from quic-go's
// server (http3.HTTPStreamer), as a CONNECT's is: DATA frames each way, FIN for
// each direction's clean end (CloseWrite), a reset of both directions for an
// abort. Unlike the stream of an h2 tunnel it carries half-close.
type h3TunnelConn struct {
	*h3Stream
	once sync.Once
	done chan struct{}
}

func (c *h3TunnelConn) Close() error {
	err := c.h3Stream.Close()
	c.once.Do(func() { close(c.done) })
	return err
}

func (c *h3TunnelConn) Abort(code quic.ApplicationErrorCode) {
	c.h3Stream.Abort(code)
	c.once.Do(func() { close(c.done) })
}

func (c *h3TunnelConn) Done() <-chan struct{} { return c.done }

var _ reverse.TunnelConn = (*h3TunnelConn)(nil)
