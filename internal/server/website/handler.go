package website

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Site is one website: a static directory (Root) or an upstream URL, never both.
type Site struct {
	Name     string
	Root     string
	Upstream *url.URL
}

// Options configure a Handler.
type Options struct {
	// Sites are served by name (SNI and Host).
	Sites []Site
	// Default names the site that answers TLS names no site has; "" refuses them
	// (KnowsName reports false, and the handshake fails).
	Default string
	// OwnNames are the proxy's own names (DNS names or IP addresses), served by Own.
	// A handshake without SNI is taken to be for them.
	OwnNames []string
	// Own serves the proxy's own endpoints on OwnNames. Requests under OwnPrefixes
	// reach it even when a site has the same name; other requests on an own name
	// go to that site if there is one.
	Own         http.Handler
	OwnPrefixes []string
	// MaxBody bounds request bodies forwarded to an upstream (default 10 MiB).
	MaxBody int64
	// UpstreamTimeout bounds the wait for an upstream's response headers (default 1m).
	UpstreamTimeout time.Duration
	// Logger receives one access-log line per request. Default slog.Default().
	Logger *slog.Logger

	// Reverse, when set, finds the upstream of a name exposed over a reverse
	// HTTP tunnel (LABEL.<ReverseZone>) while it is held: such a name is served
	// like an upstream site (same bounds, X-Forwarded-*, access log), through the
	// tunnel's round-tripper. Sites and own names come first.
	Reverse func(host string) (ReverseUpstream, bool)
	// ReverseZone is the reverse names' DNS suffix: a request for a name in it
	// that is not held (any more) gets 404, as a name nobody exposes.
	ReverseZone string
	// Device checks that a request for a devices-only name carries an accepted
	// device certificate; nil refuses every such request.
	Device func(r *http.Request) error
}

// ReverseUpstream is where a reverse HTTP name's requests go.
type ReverseUpstream struct {
	Transport http.RoundTripper
	// DevicesOnly: the exposer lets only enrolled devices reach the name
	// (Options.Device decides); browsers without a device certificate get 403.
	DevicesOnly bool
}

// Handler routes a request to the site its TLS server name chose.
type Handler struct {
	sites    map[string]http.Handler
	def      http.Handler
	defName  string
	own      map[string]bool
	ownH     http.Handler
	prefixes []string
	log      *slog.Logger

	reverse     func(string) (ReverseUpstream, bool)
	reverseZone string
	device      func(*http.Request) error
	maxBody     int64
	timeout     time.Duration
}

var _ http.Handler = (*Handler)(nil)

// New checks o and opens every site's directory.
func New(o Options) (*Handler, error) {
	if o.MaxBody == 0 {
		o.MaxBody = 10 << 20
	}
	if o.UpstreamTimeout == 0 {
		o.UpstreamTimeout = time.Minute
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	h := &Handler{sites: map[string]http.Handler{}, own: map[string]bool{}, ownH: o.Own, prefixes: o.OwnPrefixes, log: o.Logger,
		reverse: o.Reverse, reverseZone: canonicalHost(o.ReverseZone), device: o.Device, maxBody: o.MaxBody, timeout: o.UpstreamTimeout}
	var errs []error
	for _, s := range o.Sites {
		name := canonicalHost(s.Name)
		if _, dup := h.sites[name]; dup || name == "" {
			errs = append(errs, fmt.Errorf("site %q: empty or configured twice", s.Name))
			continue
		}
		var sh http.Handler
		var err error
		switch {
		case s.Root != "" && s.Upstream == nil:
			sh, err = newStatic(s.Root)
		case s.Root == "" && s.Upstream != nil:
			sh = newUpstream(name, s.Upstream, o.MaxBody, o.UpstreamTimeout, o.Logger)
		default:
			err = errors.New("needs either a root directory or an upstream URL")
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("site %s: %w", s.Name, err))
			continue
		}
		h.sites[name] = sh
	}
	for _, n := range o.OwnNames {
		h.own[canonicalHost(n)] = true
	}
	if o.Own == nil && len(o.OwnNames) > 0 {
		errs = append(errs, errors.New("Own handler is required with OwnNames"))
	}
	if o.Default != "" {
		h.defName = canonicalHost(o.Default)
		if h.def = h.sites[h.defName]; h.def == nil {
			errs = append(errs, fmt.Errorf("default site %q is not one of the sites", o.Default))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return h, nil
}

// KnowsName reports whether a TLS handshake for serverName (SNI, "" when the
// client sent none) should be accepted for the website.
func (h *Handler) KnowsName(serverName string) bool {
	n := canonicalHost(serverName)
	if n == "" {
		return len(h.own) > 0
	}
	return h.sites[n] != nil || h.own[n] || h.def != nil || h.reverseHeld(n)
}

// reverseHeld reports whether n is a reverse HTTP name held right now.
func (h *Handler) reverseHeld(n string) bool {
	if h.reverse == nil {
		return false
	}
	_, ok := h.reverse(n)
	return ok
}

// IsReverse reports whether name is a reverse HTTP name held right now (a
// handshake for it gets a certificate for it).
func (h *Handler) IsReverse(name string) bool {
	n := canonicalHost(name)
	return h.sites[n] == nil && !h.own[n] && h.reverseHeld(n)
}

// inReverseZone reports whether n is a name below the reverse zone.
func (h *Handler) inReverseZone(n string) bool {
	return h.reverseZone != "" && strings.HasSuffix(n, "."+h.reverseZone)
}

// serveReverse sends a request for the held reverse name host down its
// tunnel: the same bounds and errors as an upstream site, a header timeout
// the tunnel's round-tripper does not have of its own.
func (h *Handler) serveReverse(w http.ResponseWriter, r *http.Request, host string, up ReverseUpstream) {
	if up.DevicesOnly {
		if h.device == nil || r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			http.Error(w, fmt.Sprintf("403 Forbidden: %s is open to enrolled devices only; connect with a device certificate (tp).", host), http.StatusForbidden)
			return
		}
		if err := h.device(r); err != nil {
			http.Error(w, fmt.Sprintf("403 Forbidden: %s is open to enrolled devices only, and this device certificate is not accepted: %v", host, err), http.StatusForbidden)
			return
		}
	}
	target := &url.URL{Scheme: "http", Host: host}
	proxyTo(host, target, "reverse tunnel", headerTimeout{rt: up.Transport, timeout: h.timeout}, h.maxBody, h.timeout, h.log).ServeHTTP(w, r)
}

// IsSite reports whether name is a configured site (whose certificate comes from ACME).
func (h *Handler) IsSite(name string) bool { return h.sites[canonicalHost(name)] != nil }

// Default is the name of the site that answers names no site has; "" when none does.
func (h *Handler) Default() string { return h.defName }

// IsOwn reports whether name is one of the proxy's own names.
func (h *Handler) IsOwn(name string) bool { return h.own[canonicalHost(name)] }

// ServeHTTP checks that the Host header names the site the TLS handshake was for
// (421 Misdirected Request otherwise: a client must not reach one site over a
// connection authenticated for another), then serves it and logs one line.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	lw := &logWriter{ResponseWriter: w, status: http.StatusOK}
	site := h.route(lw, r)
	h.log.LogAttrs(r.Context(), slog.LevelInfo, "http request",
		slog.String("site", site),
		slog.String("remote", r.RemoteAddr),
		slog.String("proto", r.Proto),
		slog.String("method", r.Method),
		slog.String("host", r.Host),
		slog.String("path", r.URL.Path),
		slog.Int("status", lw.status),
		slog.Int64("bytes", lw.bytes),
		slog.Duration("duration", time.Since(start)))
}

func (h *Handler) route(w http.ResponseWriter, r *http.Request) string {
	if r.TLS == nil {
		http.Error(w, "This server answers only over HTTPS.", http.StatusMisdirectedRequest)
		return ""
	}
	sni := canonicalHost(r.TLS.ServerName)
	host := canonicalHost(r.Host)
	switch {
	case sni == "" && !h.own[host], sni != "" && host != sni:
		msg := fmt.Sprintf("421 Misdirected Request: this connection was opened for %q and cannot serve %q; open a new connection to %s.", sni, host, host)
		if sni == "" {
			msg = fmt.Sprintf("421 Misdirected Request: this connection carried no server name and cannot serve %q; connect with that name.", host)
		}
		http.Error(w, msg, http.StatusMisdirectedRequest)
		return ""
	}
	if h.own[host] && h.ownH != nil {
		for _, p := range h.prefixes {
			if strings.HasPrefix(r.URL.Path, p) {
				h.ownH.ServeHTTP(w, r)
				return host
			}
		}
	}
	if sh := h.sites[host]; sh != nil {
		sh.ServeHTTP(w, r)
		return host
	}
	if h.reverse != nil && !h.own[host] {
		if up, ok := h.reverse(host); ok {
			h.serveReverse(w, r, host, up)
			return host
		}
		if h.inReverseZone(host) {
			http.Error(w, fmt.Sprintf("404 Not Found: nothing is exposed as %s now.", host), http.StatusNotFound)
			return ""
		}
	}
	if h.own[host] && h.ownH != nil {
		h.ownH.ServeHTTP(w, r)
		return host
	}
	if h.def != nil {
		h.def.ServeHTTP(w, r)
		return h.defName
	}
	http.Error(w, fmt.Sprintf("421 Misdirected Request: no site is configured for %q.", host), http.StatusMisdirectedRequest)
	return ""
}

// canonicalHost lower-cases a host[:port], drops the port, the brackets of an
// IPv6 literal and one trailing dot.
func canonicalHost(hostport string) string {
	h := hostport
	if host, _, err := net.SplitHostPort(hostport); err == nil {
		h = host
	}
	h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	return strings.TrimSuffix(strings.ToLower(h), ".")
}

// logWriter records the status and size of a response for the access log. It
// unwraps for http.ResponseController (flushes and hijacks by the reverse proxy).
type logWriter struct {
	http.ResponseWriter
	status      int
	bytes       int64
	wroteHeader bool
}

func (l *logWriter) WriteHeader(code int) {
	if !l.wroteHeader && code >= 200 {
		l.status, l.wroteHeader = code, true
	} else if !l.wroteHeader {
		l.status = code
	}
	l.ResponseWriter.WriteHeader(code)
}

func (l *logWriter) Write(p []byte) (int, error) {
	l.wroteHeader = true
	n, err := l.ResponseWriter.Write(p)
	l.bytes += int64(n)
	return n, err
}

func (l *logWriter) Flush() { _ = http.NewResponseController(l.ResponseWriter).Flush() }

func (l *logWriter) Unwrap() http.ResponseWriter { return l.ResponseWriter }
