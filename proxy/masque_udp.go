package proxy

// CONNECT-UDP (RFC 9298) on the proxy names: a standard MASQUE client asks for
// a UDP tunnel with an extended CONNECT whose :protocol is "connect-udp" (h2,
// h3) or a GET with Upgrade: connect-udp (HTTP/1.1), naming the target in the
// request's path by a URI template. The request enters the same path as a tp
// UDP dial (session.go: authenticate, then enter with op dial, net udp), so it
// sees the same policy input (action dial_udp), SSRF and self-dial rules,
// per-identity bounds, audit record and live re-checks. UDP payloads travel as
// HTTP Datagrams (RFC 9297) with context ID 0: in QUIC DATAGRAM frames on h3
// when both ends negotiated them, and as DATAGRAM capsules on the request
// stream otherwise (h2, HTTP/1.1, an h3 peer without datagrams). docs/HTTP.md,
// section 5, is the specification.

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/quic-go/quic-go/http3"
	"golang.org/x/net/http/httpguts"

	"github.com/tp-proxy/tp/proxy/masque"
	"github.com/tp-proxy/tp/proxy/wire"
)

// ConnectUDPToken is the :protocol (h2, h3) and Upgrade token (HTTP/1.1) of
// CONNECT-UDP.
const ConnectUDPToken = "connect-udp"

// ConnectUDPPath is the default URI template's path (RFC 9298 §3), which TP
// always accepts.
const ConnectUDPPath = "/.well-known/masque/udp/{target_host}/{target_port}/"

// ConnectUDPOptions bound CONNECT-UDP flows. Zero values take the defaults. The
// flow-count bounds and the idle timeout are those of tp UDP flows
// (Config.UDP): a CONNECT-UDP flow is a UDP flow of its identity.
type ConnectUDPOptions struct {
	// Template is a URI template accepted besides ConnectUDPPath, e.g.
	// "https://proxy.example.org/masque?h={target_host}&p={target_port}". Its
	// variables must be whole path segments or whole query values; scheme and
	// authority, if given, are not matched (the proxy name decides that).
	Template string
	// MaxDatagram is the largest UDP payload relayed either way; a larger one is
	// dropped and counted, never truncated. Default DefaultConnectUDPMaxDatagram.
	MaxDatagram int
	// MaxPacketsPerSecond bounds the datagrams one flow relays per second in
	// each direction (a burst of one second's worth is allowed); beyond it they
	// are dropped and counted. Default 20000.
	MaxPacketsPerSecond int
	// MaxBytesPerFlow bounds the payload bytes one flow carries, both directions
	// together; a flow that reaches it ends with a reason. Default 16 GiB.
	MaxBytesPerFlow int64
}

// ConnectUDPStats are the server's CONNECT-UDP counters since it started
// (masque.UDPStats).
type ConnectUDPStats = masque.UDPStats

// ConnectUDPStats returns the server's CONNECT-UDP counters.
func (s *Server) ConnectUDPStats() ConnectUDPStats { return s.cudp.Stats() }

// DefaultConnectUDPMaxDatagram is the largest UDP payload IPv4 can carry.
const DefaultConnectUDPMaxDatagram = 65507

func (o ConnectUDPOptions) withDefaults() ConnectUDPOptions {
	if o.MaxDatagram <= 0 || o.MaxDatagram > wire.MaxDatagramSize {
		o.MaxDatagram = DefaultConnectUDPMaxDatagram
	}
	if o.MaxPacketsPerSecond <= 0 {
		o.MaxPacketsPerSecond = 20000
	}
	if o.MaxBytesPerFlow <= 0 {
		o.MaxBytesPerFlow = 16 << 30
	}
	return o
}

// Validate reports a template TP cannot match.
func (o ConnectUDPOptions) Validate() error {
	if o.Template == "" {
		return nil
	}
	_, err := parseUDPTemplate(o.Template)
	return err
}

// isConnectUDP reports whether r asks for a CONNECT-UDP tunnel.
func isConnectUDP(r *http.Request) bool {
	if r.ProtoMajor == 1 {
		return httpguts.HeaderValuesContainsToken(r.Header["Upgrade"], ConnectUDPToken)
	}
	return r.Method == http.MethodConnect && strings.EqualFold(connectProtocol(r), ConnectUDPToken)
}

// serveConnectUDPHTTP serves a CONNECT-UDP request; an aborted h2 tunnel resets
// the request's stream (RST_STREAM).
func (s *Server) serveConnectUDPHTTP(w http.ResponseWriter, r *http.Request) {
	if s.serveConnectUDP(w, r) {
		panic(http.ErrAbortHandler)
	}
}

// serveConnectUDP answers one CONNECT-UDP request and relays its flow until it
// ends. It reports whether the handler must abort the request's stream.
func (s *Server) serveConnectUDP(w http.ResponseWriter, r *http.Request) (abort bool) {
	transport := "tls"
	if r.ProtoMajor == 3 {
		transport = "quic"
	}
	if r.TLS == nil { // unreachable: the proxy names are served over TLS only
		proxyRefusal(w, r, http.StatusInternalServerError, "proxy_internal_error", "the request arrived without TLS")
		return false
	}
	done, ok := s.admitProxyRequest(w, r, "CONNECT-UDP")
	if !ok {
		return false
	}
	defer done()

	ss := &session{start: time.Now(), remote: r.RemoteAddr}
	ss.audit.transport = transport
	ss.attrs = append(ss.attrs, slog.String("via", "CONNECT-UDP "+r.Proto))
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(r.Context()))
	defer cancel(nil)
	stopForce := context.AfterFunc(s.force, func() { cancel(wire.ErrShutdown) })
	defer stopForce()
	defer func() { s.logSession(ctx, ss) }()
	defer s.releaseSession(ss)

	o := s.cfg.ConnectUDP.withDefaults()
	hello, herr := connectUDPHello(r, o)
	if herr == nil {
		herr = s.authenticate(*r.TLS, ss)
	}
	if herr == nil && s.rev != nil {
		if _, ok := s.rev.Name(canonicalHost(hello.Host)); ok {
			herr = errConnectUDPReverse(hello.Host)
		}
	}
	var upstream net.Conn
	if herr == nil {
		stopGone := context.AfterFunc(r.Context(), func() { cancel(context.Canceled) })
		upstream, herr = s.enter(ctx, nil, transport, ss, hello)
		gone := !stopGone()
		countCancel(r.Context(), gone) // flood.go: a rapid reset's count
		if gone && upstream != nil {
			_ = upstream.Close()
			ss.end = "the client went away before the flow was set up"
			return false
		}
	}
	if herr == nil && (upstream == nil || ss.peer != "destination") {
		// A reverse name's agent is reached through TP's own UDP relay, which a
		// standard client cannot drive.
		if upstream != nil {
			wire.Abort(upstream, wire.QUICPeerReset)
		}
		herr = errConnectUDPReverse(hello.Host)
	}
	var release func()
	if herr == nil {
		release, herr = s.udp.acquire(ss.id.String(), nil, s.cfg.UDP.withDefaults())
		if herr != nil {
			_ = upstream.Close()
		}
	}
	if herr != nil {
		ss.code = herr.Code
		if ss.end == "" {
			ss.end = herr.Error()
		}
		status, perr := statusOf(herr.Code)
		if herr.Code == wire.CodeTooManyFlows {
			status, perr = http.StatusTooManyRequests, "connection_limit_reached"
		}
		proxyRefusal(w, r, status, perr, herr.Reason)
		return false
	}
	defer release()
	defer upstream.Close()

	ss.sid = newSessionID()
	t, err := masque.AcceptUDP(w, r, ss.sid)
	if err != nil {
		ss.end = "answering the CONNECT-UDP request: " + err.Error()
		return r.ProtoMajor == 2
	}
	bctx, revoke := context.WithCancelCause(ctx)
	defer revoke(nil)
	expire := time.AfterFunc(time.Until(ss.id.NotAfter), func() { revoke(wire.ErrCertExpired) })
	defer expire.Stop()
	defer s.sessions.add(&liveSession{cs: *r.TLS, req: ss.req, revoke: revoke})()

	lim := masque.UDPLimits{MaxDatagram: o.MaxDatagram, MaxPacketsPerSecond: o.MaxPacketsPerSecond, MaxBytesPerFlow: o.MaxBytesPerFlow}
	st := s.cudp.Relay(bctx, t, upstream, lim, s.cfg.UDP.withDefaults().IdleTimeout)
	ss.up, ss.down = st.Bytes()
	ss.end = st.End()
	ss.attrs = append(ss.attrs, st.Attrs()...)
	if st.MalformedCapsule() {
		ss.code = wire.CodeBadRequest
	}
	return t.AbortHandler()
}

// errConnectUDPReverse refuses a reverse name, before anything reaches its
// agent: an agent is reached through TP's own UDP relay, which a standard
// client cannot drive.
func errConnectUDPReverse(host string) *wire.HelloError {
	return wire.Errorf(wire.CodeUnsupportedNetwork, "%s is a reverse name: CONNECT-UDP reaches only destinations on the network; reach exposed UDP services with tp forward --udp", host)
}

// connectUDPHello is the client hello a CONNECT-UDP request stands for: op
// dial, UDP, host and port from the request's path as the template names them.
func connectUDPHello(r *http.Request, o ConnectUDPOptions) (wire.ClientHello, *wire.HelloError) {
	if r.ProtoMajor == 1 && r.Method != http.MethodGet {
		return wire.ClientHello{}, wire.Errorf(wire.CodeBadRequest, "an HTTP/1.1 CONNECT-UDP request is a GET with Upgrade: connect-udp (RFC 9298, section 3.2), not %s", r.Method)
	}
	if cp := r.Header.Get(http3.CapsuleProtocolHeader); cp != "" && !strings.HasPrefix(strings.TrimSpace(cp), "?1") {
		return wire.ClientHello{}, wire.Errorf(wire.CodeBadRequest, "Capsule-Protocol is %q; CONNECT-UDP uses the capsule protocol (?1)", truncateForReason(cp))
	}
	host, portStr, ok := matchUDPTemplate(r.URL, ConnectUDPPath)
	if !ok && o.Template != "" {
		host, portStr, ok = matchUDPTemplate(r.URL, o.Template)
	}
	if !ok {
		want := ConnectUDPPath
		if o.Template != "" {
			want += " or " + o.Template
		}
		return wire.ClientHello{}, wire.Errorf(wire.CodeBadRequest, "the request's path %q does not match this server's CONNECT-UDP template %s", truncateForReason(r.URL.EscapedPath()), want)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 || strings.TrimLeft(portStr, "0123456789") != "" {
		return wire.ClientHello{}, wire.Errorf(wire.CodeBadRequest, "CONNECT-UDP target_port %q is not a port (1 to 65535)", truncateForReason(portStr))
	}
	if host == "" || len(host) > wire.MaxHostLen {
		return wire.ClientHello{}, wire.Errorf(wire.CodeBadRequest, "CONNECT-UDP target_host is empty or longer than %d bytes", wire.MaxHostLen)
	}
	if strings.Contains(host, ":") {
		// RFC 9298 §3: an IPv6 literal, its colons percent-encoded, no brackets.
		a, err := netip.ParseAddr(host)
		if err != nil || !a.Is6() || a.Zone() != "" {
			return wire.ClientHello{}, wire.Errorf(wire.CodeBadRequest, "CONNECT-UDP target_host %q is neither a DNS name, an IPv4 address nor an IPv6 address without zone", truncateForReason(host))
		}
	}
	return wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "udp", Host: host, Port: port}, nil
}

// udpTemplate is a parsed URI template: path segments and query pairs, each a
// literal or one of the variables.
type udpTemplate struct {
	segs  []string    // escaped literal, or "{target_host}" / "{target_port}"
	query [][2]string // key, literal value or variable
}

const (
	varHost = "{target_host}"
	varPort = "{target_port}"
)

// parseUDPTemplate reads a template of the simple form TP matches: an optional
// scheme and authority, a path, an optional query; each variable a whole path
// segment or a whole query value, each used once.
func parseUDPTemplate(tmpl string) (udpTemplate, error) {
	var t udpTemplate
	rest := tmpl
	if i := strings.Index(rest, "://"); i >= 0 {
		rest = rest[i+3:]
		j := strings.IndexByte(rest, '/')
		if j < 0 {
			return t, fmt.Errorf("CONNECT-UDP template %q has no path", tmpl)
		}
		rest = rest[j:]
	}
	if !strings.HasPrefix(rest, "/") {
		return t, fmt.Errorf("CONNECT-UDP template %q must be an absolute path or URL", tmpl)
	}
	path, query, _ := strings.Cut(rest, "?")
	seen := map[string]int{}
	for _, seg := range strings.Split(path, "/") {
		if strings.ContainsAny(seg, "{}") && seg != varHost && seg != varPort {
			return t, fmt.Errorf("CONNECT-UDP template %q: %q must be a literal or exactly {target_host} or {target_port}", tmpl, seg)
		}
		seen[seg]++
		t.segs = append(t.segs, seg)
	}
	if query != "" {
		for _, kv := range strings.Split(query, "&") {
			k, v, _ := strings.Cut(kv, "=")
			if strings.ContainsAny(k, "{}") || strings.ContainsAny(v, "{}") && v != varHost && v != varPort {
				return t, fmt.Errorf("CONNECT-UDP template %q: query %q must be key=literal or key={target_host}/{target_port}", tmpl, kv)
			}
			seen[v]++
			t.query = append(t.query, [2]string{k, v})
		}
	}
	if seen[varHost] != 1 || seen[varPort] != 1 {
		return t, fmt.Errorf("CONNECT-UDP template %q must use {target_host} and {target_port} once each", tmpl)
	}
	return t, nil
}

// matchUDPTemplate returns the percent-decoded variables of u under tmpl.
func matchUDPTemplate(u *url.URL, tmpl string) (host, port string, ok bool) {
	t, err := parseUDPTemplate(tmpl)
	if err != nil || u == nil {
		return "", "", false
	}
	segs := strings.Split(u.EscapedPath(), "/")
	if len(segs) != len(t.segs) {
		return "", "", false
	}
	set := func(v, raw string) bool {
		dec, err := url.PathUnescape(raw)
		if err != nil {
			return false
		}
		switch v {
		case varHost:
			host = dec
		case varPort:
			port = dec
		}
		return true
	}
	for i, ts := range t.segs {
		switch ts {
		case varHost, varPort:
			if !set(ts, segs[i]) {
				return "", "", false
			}
		default:
			if ts != segs[i] {
				return "", "", false
			}
		}
	}
	if len(t.query) > 0 {
		q, err := url.ParseQuery(u.RawQuery)
		if err != nil {
			return "", "", false
		}
		for _, kv := range t.query {
			vals := q[kv[0]]
			if len(vals) != 1 {
				return "", "", false
			}
			switch kv[1] {
			case varHost:
				host = vals[0]
			case varPort:
				port = vals[0]
			default:
				if vals[0] != kv[1] {
					return "", "", false
				}
			}
		}
	}
	return host, port, true
}
