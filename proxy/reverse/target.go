package reverse

// The requests of draft-kazuho-httpbis-reverse-tunnel-00 (docs/HTTP.md §2):
// which requests ask for a reverse tunnel, what a tunnel URI names, the ALPN
// fields of the tunnel request and its answer, and the refusal of a request
// that is not a tunnel TP holds.

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Tunnel URI prefixes.
const (
	// httpPath + LABEL is the tunnel URI of an HTTP app for reverse name
	// LABEL.<reverse-zone>.
	httpPath = "/.well-known/tp/reverse-http/"
	// listenTCPPath + ADDR/PORT/ is the draft's TCP relay URI (listen-tcp well-known
	// URI of its IANA section and figure); reverseTCPPath is the spelling of its
	// URI template section, accepted too.
	listenTCPPath  = "/.well-known/listen-tcp/"
	reverseTCPPath = "/.well-known/reverse/tcp/"
	upgradeToken   = "reverse"
)

// AccessField is the tunnel request's header field by which an exposer chooses
// who may reach its HTTP app: "anyone" (the default) or "devices" (enrolled
// devices only; tpd's website then requires a device certificate).
const AccessField = "TP-Access"

// IsReverseTunnel reports whether r asks for a reverse tunnel: an HTTP/1.1
// Upgrade to "reverse", or an extended CONNECT with :protocol "reverse" over h2
// or h3. The proxy-name router sends such requests to the server's
// ServeReverseTunnel.
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

// Target is what a tunnel URI names.
type Target struct {
	Label string // HTTP app: the reverse label
	Full  string // its full name
	Port  int    // listen-tcp: the public port
	Addr  string // listen-tcp: the listen address as the URI gave it
	// DevicesOnly: the exposer lets only enrolled devices reach the HTTP app
	// (request field TP-Access: devices).
	DevicesOnly bool
}

// Key is the registry key the target is held under: its full name, or
// "tcp/PORT".
func (t Target) Key() string {
	if t.Port != 0 {
		return "tcp/" + strconv.Itoa(t.Port)
	}
	return t.Full
}

// String names the target for people.
func (t Target) String() string {
	if t.Port != 0 {
		return "public TCP port " + strconv.Itoa(t.Port)
	}
	return t.Full
}

// Refusal is an answer to a tunnel request that is not a tunnel: an HTTP
// status, a refusal code (docs/PROTOCOL.md) and the reason for people.
type Refusal struct {
	Status int
	Code   string
	Reason string
}

func (e *Refusal) Error() string { return e.Reason }

// Refuse makes a Refusal whose reason is formatted as by fmt.Sprintf.
func Refuse(status int, code, format string, args ...any) *Refusal {
	return &Refusal{Status: status, Code: code, Reason: fmt.Sprintf(format, args...)}
}

// ParseTarget reads the tunnel URI's path. Reverse names live under zone;
// public ports listen on publicHost ("" = every address).
func ParseTarget(path, zone, publicHost string) (Target, *Refusal) {
	switch {
	case strings.HasPrefix(path, httpPath):
		label := strings.ToLower(strings.TrimSuffix(path[len(httpPath):], "/"))
		if !validLabel(label) {
			return Target{}, Refuse(http.StatusBadRequest, wire.CodeBadRequest,
				"%q is no reverse name: the tunnel URI is %sLABEL, LABEL one DNS label (letters, digits, hyphens; at most 63)", label, httpPath)
		}
		return Target{Label: label, Full: label + "." + zone}, nil
	case strings.HasPrefix(path, listenTCPPath), strings.HasPrefix(path, reverseTCPPath):
		rest := strings.TrimPrefix(strings.TrimPrefix(path, listenTCPPath), reverseTCPPath)
		parts := strings.Split(strings.TrimSuffix(rest, "/"), "/")
		if len(parts) != 2 {
			return Target{}, Refuse(http.StatusBadRequest, wire.CodeBadRequest,
				"the TCP relay URI is %s{listen_host}/{listen_port}/; got %q", listenTCPPath, path)
		}
		port, err := strconv.Atoi(parts[1])
		if err != nil || port < 1 || port > 65535 {
			return Target{}, Refuse(http.StatusBadRequest, wire.CodeBadRequest, "listen_port %q is no TCP port (1-65535)", parts[1])
		}
		if !listenHostOK(parts[0], publicHost) {
			host := publicHost
			if host == "" {
				host = "0.0.0.0 or ::"
			}
			return Target{}, Refuse(http.StatusBadRequest, wire.CodePublicRefused,
				"TP opens public ports on one address, %s; ask for it or for a wildcard address (0.0.0.0, ::), not %q", host, parts[0])
		}
		return Target{Port: port, Addr: parts[0]}, nil
	}
	return Target{}, Refuse(http.StatusNotFound, wire.CodeBadRequest,
		"no reverse tunnel at %q: TP's tunnel URIs are %sLABEL (HTTP) and %s{listen_host}/{listen_port}/ (TCP relay)", path, httpPath, listenTCPPath)
}

// listenHostOK reports whether listen_host names where TP's public ports listen:
// a wildcard address, or publicHost itself.
func listenHostOK(h, publicHost string) bool {
	h = strings.Trim(h, "[]")
	if h == "*" {
		return true
	}
	if a, err := netip.ParseAddr(h); err == nil && a.IsUnspecified() {
		return true
	}
	return h != "" && h == strings.Trim(publicHost, "[]")
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

// ParseALPN reads the ALPN header field (RFC 7639): comma-separated,
// percent-encoded protocol identifiers. ok is false when the field is absent.
func ParseALPN(h http.Header) (ids []string, ok bool, err error) {
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

// ALPNToken encodes an identifier for the Selected-ALPN field (RFC 7639 §2.1).
func ALPNToken(id string) string {
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

// ChooseALPN picks what runs inside the tunnel. An HTTP app's tunnel carries
// h2 when offered, else http/1.1; without an ALPN field TP assumes http/1.1
// (and sends no Selected-ALPN, as the draft requires). A listen-tcp tunnel
// that offers h2 binds (one CONNECT per connection); otherwise it relays bytes.
func ChooseALPN(t Target, offered []string, hasALPN bool) string {
	has := func(p string) bool {
		for _, o := range offered {
			if o == p {
				return true
			}
		}
		return false
	}
	switch {
	case t.Port != 0 && has("h2"):
		return "h2"
	case t.Port != 0:
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

// Forwarded is the Forwarded field (RFC 7239) TP sends with a public
// connection handed to a listen-tcp tunnel: the public client's address, and
// the public port's when known.
func Forwarded(peer, by string) string {
	fwd := "for=" + quoteForwarded(peer)
	if by != "" {
		fwd += ";by=" + quoteForwarded(by)
	}
	return fwd
}

// quoteForwarded writes a node of the Forwarded field (RFC 7239): an address
// with a port (or IPv6) is a quoted string.
func quoteForwarded(addr string) string {
	if strings.ContainsAny(addr, ":[") {
		return strconv.Quote(addr)
	}
	return addr
}
