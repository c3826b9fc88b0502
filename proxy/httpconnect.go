package proxy

// CONNECT (RFC 9110 §9.3.6, HTTP/2: RFC 9113 §8.5, HTTP/3: RFC 9114 §4.4) on
// the proxy names. A CONNECT request enters the same path as a "tp/1" dial
// (session.go: authenticate, then enter with the hello the request stands for),
// so it sees the same policy input (action dial), the same SSRF and self-dial
// rules, the same per-identity bounds, audit record and live re-checks. Refusals
// are HTTP status codes with the reason in the body and a Proxy-Status header
// (RFC 9209); after 200 the tunnel is relayed by wire.Bridge, whose aborts
// reach the client as a TCP reset (HTTP/1.1), RST_STREAM (h2) or a stream reset
// with H3_CONNECT_ERROR (h3), never as a clean end.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// serveConnectHTTP serves a CONNECT request; an aborted tunnel resets the
// request's stream (h2: RST_STREAM; HTTP/1.1 and h3 tunnels were reset by
// Bridge already).
func (s *Server) serveConnectHTTP(w http.ResponseWriter, r *http.Request) {
	if s.serveConnect(w, r) {
		panic(http.ErrAbortHandler)
	}
}

// serveConnect answers one CONNECT request and relays its tunnel until it ends.
// It reports whether the handler must abort the request's stream.
func (s *Server) serveConnect(w http.ResponseWriter, r *http.Request) (abort bool) {
	transport := "tls"
	if r.ProtoMajor == 3 {
		transport = "quic"
	}
	if r.TLS == nil { // unreachable: the proxy names are served over TLS only
		proxyRefusal(w, r, http.StatusInternalServerError, "proxy_internal_error", "the request arrived without TLS")
		return false
	}
	done, ok := s.admitProxyRequest(w, r, "CONNECT")
	if !ok {
		return false
	}
	defer done()

	ss := &session{start: time.Now(), remote: r.RemoteAddr}
	ss.audit.transport = transport
	ss.attrs = append(ss.attrs, slog.String("via", "CONNECT "+r.Proto))
	// The tunnel lives on after an HTTP/1.1 handler hijacked its connection, so
	// it ends with the server (Shutdown's force), not with the request; the
	// set-up also ends when the client goes away.
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(r.Context()))
	defer cancel(nil)
	stopForce := context.AfterFunc(s.force, func() { cancel(wire.ErrShutdown) })
	defer stopForce()
	defer func() { s.logSession(ctx, ss) }()
	defer s.releaseSession(ss)

	hello, herr := connectHello(r)
	if herr == nil {
		herr = s.authenticate(*r.TLS, ss)
	}
	var upstream net.Conn
	if herr == nil {
		stopGone := context.AfterFunc(r.Context(), func() { cancel(context.Canceled) })
		upstream, herr = s.enter(ctx, nil, transport, ss, hello)
		gone := !stopGone()
		countCancel(r.Context(), gone) // flood.go: a rapid reset's count
		if gone && upstream != nil {   // the client went away meanwhile: no tunnel
			_ = upstream.Close()
			ss.end = "the client went away before the tunnel was set up"
			return false
		}
	}
	if herr == nil && ss.e2e {
		// A protected reverse name's agent accepts only TP's own end-to-end
		// TLS (docs/PROTOCOL.md, section 11.4), which no standard client speaks.
		wire.Abort(upstream, wire.QUICPeerReset)
		upstream = nil
		herr = wire.Errorf(CodeE2ERequired, "%s is a protected reverse name: its agent accepts only TP's end-to-end TLS, so reach it with tp (tp connect, tp forward); over CONNECT only public reverse names can be reached", hello.Host)
	}
	if herr == nil && upstream == nil { // unreachable: only op dial enters here
		herr = wire.Errorf(wire.CodeInternal, "the TP server could not set up the tunnel")
	}
	if herr != nil {
		ss.code = herr.Code
		if ss.end == "" {
			ss.end = herr.Error()
		}
		status, perr := statusOf(herr.Code)
		proxyRefusal(w, r, status, perr, herr.Reason)
		return false
	}

	ss.sid = newSessionID()
	bctx, bcancel := context.WithCancelCause(ctx)
	defer bcancel(nil)
	tunnel, err := s.acceptConnect(w, r, ss, bcancel)
	if err != nil {
		wire.Abort(upstream, wire.QUICPeerReset)
		ss.end = "answering the CONNECT: " + err.Error()
		return true
	}
	s.relay(bctx, tunnel, r.TLS, ss, upstream)
	if a, ok := tunnel.(interface{ resetByHandler() bool }); ok {
		return a.resetByHandler()
	}
	return false
}

// CodeE2ERequired refuses a CONNECT to a protected reverse name (audit
// records carry it as end_code).
const CodeE2ERequired = "e2e_required"

// connectHello is the client hello a CONNECT request stands for: op dial, TCP,
// host and port from the request's authority (host:port; RFC 9110 §9.3.6).
func connectHello(r *http.Request) (wire.ClientHello, *wire.HelloError) {
	authority := r.Host
	host, portStr, err := net.SplitHostPort(authority)
	if err != nil || host == "" || portStr == "" {
		return wire.ClientHello{}, wire.Errorf(wire.CodeBadRequest, "CONNECT needs host:port as its target (e.g. CONNECT example.org:443), not %q", truncateForReason(authority))
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 || strings.TrimLeft(portStr, "0123456789") != "" {
		return wire.ClientHello{}, wire.Errorf(wire.CodeBadRequest, "CONNECT target %q has no valid port (1 to 65535)", truncateForReason(authority))
	}
	if len(host) > wire.MaxHostLen {
		return wire.ClientHello{}, wire.Errorf(wire.CodeBadRequest, "CONNECT target host is longer than %d bytes", wire.MaxHostLen)
	}
	return wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: host, Port: port}, nil
}

func truncateForReason(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

// statusOf maps a refusal code to the HTTP status and the RFC 9209 error type
// of the CONNECT's answer (docs/HTTP.md, section 1).
func statusOf(code string) (status int, proxyError string) {
	switch code {
	case wire.CodeBadRequest:
		return http.StatusBadRequest, "http_request_error"
	case wire.CodeUnauthenticated:
		return http.StatusForbidden, "http_request_denied"
	case wire.CodePolicyDenied, CodeE2ERequired:
		return http.StatusForbidden, "http_request_denied"
	case wire.CodeSelfDial:
		return http.StatusForbidden, "destination_ip_prohibited"
	case wire.CodePolicyError:
		return http.StatusServiceUnavailable, "proxy_internal_error"
	case CodeTooManySessions, CodeTooManyPending:
		return http.StatusTooManyRequests, "connection_limit_reached"
	case wire.CodeResolveFailed:
		return http.StatusBadGateway, "dns_error"
	case wire.CodeDialRefused:
		return http.StatusBadGateway, "connection_refused"
	case wire.CodeDialTimeout:
		return http.StatusGatewayTimeout, "connection_timeout"
	case wire.CodeDialFailed:
		return http.StatusBadGateway, "destination_unavailable"
	case wire.CodeReverseUnknown:
		return http.StatusBadGateway, "destination_not_found"
	case wire.CodeReverseOffline, wire.CodeUnsupportedNetwork:
		return http.StatusBadGateway, "destination_unavailable"
	case wire.CodeHelloTimeout: // the server is draining
		return http.StatusServiceUnavailable, "proxy_internal_response"
	}
	return http.StatusInternalServerError, "proxy_internal_error"
}

// maxProxyStatusDetails bounds the details parameter of Proxy-Status; the whole
// reason is in the body.
const maxProxyStatusDetails = 300

// proxyRefusal answers r with status, a Proxy-Status header naming this proxy
// (the proxy name the client connected to) and the RFC 9209 error type
// proxyError with reason as details, and reason as the body.
func proxyRefusal(w http.ResponseWriter, r *http.Request, status int, proxyError, reason string) {
	name := "tp"
	if r.TLS != nil && r.TLS.ServerName != "" {
		name = r.TLS.ServerName
	}
	h := w.Header()
	h.Set("Proxy-Status", proxyStatus(name, proxyError, reason))
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, reason+"\n")
}

// proxyStatus renders one Proxy-Status member (RFC 9209 §2): the proxy's name
// as a token when it is one (a DNS name starting with a letter), else as a
// string, with the error type and details.
func proxyStatus(name, proxyError, details string) string {
	if len(details) > maxProxyStatusDetails {
		details = details[:maxProxyStatusDetails] + "..."
	}
	return sfItem(name) + "; error=" + proxyError + "; details=" + sfString(details)
}

// sfItem is name as a Structured Field token (RFC 8941 §3.3.4) when it is one,
// else as a string.
func sfItem(name string) string {
	if name == "" || !(name[0] >= 'a' && name[0] <= 'z' || name[0] >= 'A' && name[0] <= 'Z') {
		return sfString(name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~:/", c) >= 0) {
			return sfString(name)
		}
	}
	return name
}

// sfString is s as a Structured Field string (RFC 8941 §3.3.3): printable
// ASCII, with '"' and '\' escaped; any other byte becomes '?'.
func sfString(s string) string {
	var b strings.Builder
	b.Grow(len(s) + 2)
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c < 0x20 || c > 0x7e:
			b.WriteByte('?')
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// acceptConnect answers 200 and returns the tunnel's client side as a stream
// Bridge can half-close and abort: the hijacked TLS connection (HTTP/1.1), the
// request's body and response (h2), or the request stream (h3). halfClosed
// ends the bridge when an h2 tunnel must stop early (see h2Tunnel.CloseWrite).
func (s *Server) acceptConnect(w http.ResponseWriter, r *http.Request, ss *session, halfClosed context.CancelCauseFunc) (wire.Stream, error) {
	w.Header().Set("TP-Session", ss.sid)
	switch r.ProtoMajor {
	case 1:
		return hijackTunnel(w, ss.sid)
	case 2:
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		if err := rc.Flush(); err != nil {
			return nil, err
		}
		return &h2Tunnel{body: r.Body, w: w, rc: rc, remote: r.RemoteAddr, halfClosed: halfClosed}, nil
	case 3:
		return h3Tunnel(w, r)
	}
	return nil, fmt.Errorf("CONNECT over %s is not served", r.Proto)
}

// hijackTunnel takes the connection of an HTTP/1.1 CONNECT and answers 200 on it.
func hijackTunnel(w http.ResponseWriter, sid string) (wire.Stream, error) {
	c, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	_ = c.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\nTP-Session: "+sid+"\r\n\r\n"); err != nil {
		_ = c.Close()
		return nil, err
	}
	_ = c.SetWriteDeadline(time.Time{})
	tc, ok := c.(*tls.Conn)
	if !ok { // unreachable: proxy names are served over TLS
		_ = c.Close()
		return nil, errors.New("the hijacked connection is not TLS")
	}
	if n := brw.Reader.Buffered(); n > 0 {
		// The client sent tunnel data right behind its request (allowed, if
		// optimistic): it is read first.
		pending := make([]byte, n)
		_, _ = io.ReadFull(brw.Reader, pending)
		return &pendingConn{Conn: tc, pending: pending}, nil
	}
	return tc, nil
}

// pendingConn is a hijacked TLS connection with bytes already read from it.
type pendingConn struct {
	*tls.Conn
	pending []byte
}

func (p *pendingConn) Read(b []byte) (int, error) {
	if len(p.pending) > 0 {
		n := copy(b, p.pending)
		p.pending = p.pending[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

// Unwrap is the TLS connection, which wire.Abort resets.
func (p *pendingConn) Unwrap() net.Conn { return p.Conn }

// admitProxyRequest admits a request on a proxy name that becomes a session
// (CONNECT, CONNECT-UDP, CONNECT-IP), or answers it with the refusal: not while
// the server drains, and each such session holds a slot of MaxConns, as each
// QUIC stream does (an h2 or h3 connection carries many). The caller calls
// done when the session has ended.
func (s *Server) admitProxyRequest(w http.ResponseWriter, r *http.Request, via string) (done func(), ok bool) {
	if s.draining.Err() != nil || !s.addWorker() {
		if r.ProtoMajor == 1 {
			w.Header().Set("Connection", "close")
		}
		proxyRefusal(w, r, http.StatusServiceUnavailable, "proxy_internal_response", "the TP server is shutting down; connect again in a moment")
		return nil, false
	}
	if !s.acquire() {
		s.wg.Done()
		proxyRefusal(w, r, http.StatusServiceUnavailable, "connection_limit_reached", "the TP server is at its connection limit; try again later")
		s.log.Warn(via+" refused: too many connections", "remote", r.RemoteAddr, "max_conns", s.lim().MaxConns)
		return nil, false
	}
	return func() { s.release(); s.wg.Done() }, true
}
