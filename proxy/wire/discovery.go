package wire

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/url"
	"strings"
)

// DiscoveryPath is where a TP server answers its transport discovery document
// (docs/HTTP.md, section 3), on its own names and on its proxy names, over
// HTTPS without a client certificate.
const DiscoveryPath = "/.well-known/tp"

// DiscoverySchema is the discovery document's schema version. Fields may be
// added within a schema (a reader ignores fields it does not know); a change
// that would mislead an older reader gets a new number.
const DiscoverySchema = 1

// MaxDiscoverySize bounds a discovery document: a reader refuses a longer one.
const MaxDiscoverySize = 64 << 10

// Bounds on a discovery request's "supports" list (the query string or the
// POST body): more is refused with 400, not cut.
const (
	MaxDiscoverySupports   = 16
	MaxDiscoveryNameLen    = 32
	MaxDiscoveryRequestLen = 1024
)

// Transport names in a discovery document. The list is open: a reader skips
// names it does not know (later carriers, docs/HTTP.md section 3).
const (
	DiscoverQUIC      = "quic"       // tp/1 over QUIC on UDP
	DiscoverTLS       = "tls"        // tp/1 over TLS on TCP
	DiscoverConnect   = "connect"    // HTTPS CONNECT proxy, HTTP/1.1 and h2, on a proxy name
	DiscoverConnectH3 = "connect-h3" // HTTP/3 CONNECT proxy on a proxy name
	// The carriers of tp/1's QUIC connection over TCP (docs/PROTOCOL.md,
	// "Carriers"): a TLS stream with ALPN "tp-carrier/1", a WebSocket at URL.
	DiscoverCarrierTLS  = "carrier-tls"
	DiscoverCarrierWS   = "carrier-ws"
	DiscoverCarrierHTTP = "carrier-http"
)

// AuthDeviceCertificate says a transport needs the device's TLS client
// certificate (dlogin's), the only authentication TP offers today.
const AuthDeviceCertificate = "device-certificate"

// Discovery is the transport discovery document.
type Discovery struct {
	Schema int `json:"schema"`
	// Software and Version name the server's implementation ("tpd", "v0.1.0").
	Software string `json:"software"`
	Version  string `json:"version"`
	// ALPN and ProtocolVersions are the TP protocol the "tp" transports speak:
	// the TLS application protocol and the hello versions (docs/PROTOCOL.md).
	ALPN             string `json:"alpn"`
	ProtocolVersions []int  `json:"protocol_versions"`
	// Transports are offered in the server's order of preference.
	Transports []DiscoveredTransport `json:"transports"`
	// Chosen is the transport picked for a request that said which it supports:
	// the first of the client's list that the server offers. Absent when the
	// request said nothing, or nothing it named is offered.
	Chosen *DiscoveredTransport `json:"chosen,omitempty"`
	// Reverse is where services are exposed; absent when reverse listeners are off.
	Reverse *DiscoveredReverse `json:"reverse,omitempty"`
	// ConnectUDP is the CONNECT-UDP (RFC 9298) URI template on the proxy name,
	// e.g. https://proxy.example:443/.well-known/masque/udp/{target_host}/{target_port}/;
	// absent when the server has no proxy name. The default template is always
	// accepted too.
	ConnectUDP string `json:"connect_udp,omitempty"`
}

// DiscoveredTransport is one way to reach the server.
type DiscoveredTransport struct {
	Name    string `json:"name"`
	Network string `json:"network"` // "udp" or "tcp"
	// Host is the TLS server name to send and the host to connect to; Port the
	// port. Both are what the client used to fetch the document, so they hold
	// behind a port mapping (a proxy name replaces the host for the HTTP proxy).
	Host string   `json:"host"`
	Port int      `json:"port"`
	ALPN []string `json:"alpn"`
	Auth string   `json:"auth"`
	// URL is set for transports that are HTTP endpoints (the CONNECT proxy's
	// https://name:port URL; later carriers' paths).
	URL string `json:"url,omitempty"`
}

// Addr is the transport's host:port.
func (t DiscoveredTransport) Addr() string {
	return net.JoinHostPort(t.Host, fmt.Sprint(t.Port))
}

// DiscoveredReverse says where and how services are exposed.
type DiscoveredReverse struct {
	// Zone is the DNS suffix of reverse names (LABEL.zone).
	Zone string `json:"zone"`
	// HTTP is the reverse-tunnel URI template for exposing an HTTP service
	// (draft-kazuho-httpbis-reverse-tunnel), "{label}" to be replaced; ListenTCP
	// the draft's listen-tcp template, "{addr}" and "{port}" to be replaced.
	// Empty when the server has no proxy name.
	HTTP      string `json:"http,omitempty"`
	ListenTCP string `json:"listen_tcp,omitempty"`
	// PublicPorts are the ports exposures may open publicly (tp expose
	// --public, listen-tcp); Net "" is both networks.
	PublicPorts []DiscoveredPorts `json:"public_ports"`
}

// DiscoveredPorts is an inclusive port range of one network, or both when Net is "".
type DiscoveredPorts struct {
	Lo  int    `json:"lo"`
	Hi  int    `json:"hi"`
	Net string `json:"net,omitempty"`
}

// Find returns the offered transport called name.
func (d *Discovery) Find(name string) (DiscoveredTransport, bool) {
	for _, t := range d.Transports {
		if t.Name == name {
			return t, true
		}
	}
	return DiscoveredTransport{}, false
}

// Choose returns the first of supports that d offers, or false.
func (d *Discovery) Choose(supports []string) (DiscoveredTransport, bool) {
	for _, s := range supports {
		if t, ok := d.Find(s); ok {
			return t, true
		}
	}
	return DiscoveredTransport{}, false
}

// ParseDiscovery decodes a discovery document: exactly one JSON object of at
// most MaxDiscoverySize bytes, nothing after it, schema DiscoverySchema, every
// transport with a name, a network, a host and a port. Unknown fields are
// ignored (they are how a schema grows); unknown transport names are kept,
// for the reader to skip.
func ParseDiscovery(body []byte) (Discovery, error) {
	if len(body) > MaxDiscoverySize {
		return Discovery{}, fmt.Errorf("discovery document of %d bytes, more than %d", len(body), MaxDiscoverySize)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	var d Discovery
	if err := dec.Decode(&d); err != nil {
		return Discovery{}, fmt.Errorf("discovery document: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return Discovery{}, errors.New("discovery document: bytes after the JSON object")
	}
	if d.Schema != DiscoverySchema {
		return Discovery{}, fmt.Errorf("discovery document of schema %d; this side reads %d", d.Schema, DiscoverySchema)
	}
	var errs []error
	for i, t := range append(d.Transports, derefTransport(d.Chosen)...) {
		switch {
		case t.Name == "" || len(t.Name) > MaxDiscoveryNameLen:
			errs = append(errs, fmt.Errorf("transport %d: name %q", i, t.Name))
		case t.Network != "udp" && t.Network != "tcp":
			errs = append(errs, fmt.Errorf("transport %s: network %q is not udp or tcp", t.Name, t.Network))
		case t.Host == "" || len(t.Host) > MaxHostLen || strings.ContainsAny(t.Host, " /@[]"):
			errs = append(errs, fmt.Errorf("transport %s: host %q", t.Name, t.Host))
		case t.Port < 1 || t.Port > 65535:
			errs = append(errs, fmt.Errorf("transport %s: port %d", t.Name, t.Port))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Discovery{}, fmt.Errorf("discovery document: %w", err)
	}
	return d, nil
}

func derefTransport(t *DiscoveredTransport) []DiscoveredTransport {
	if t == nil {
		return nil
	}
	return []DiscoveredTransport{*t}
}

// ParseDiscoveryQuery reads the "supports" parameters of a query: names
// separated by commas, the parameter possibly repeated. Other parameters are
// ignored; a query longer than MaxDiscoveryRequestLen, more than
// MaxDiscoverySupports names or a longer name is refused.
func ParseDiscoveryQuery(raw string) ([]string, error) {
	if len(raw) > MaxDiscoveryRequestLen {
		return nil, fmt.Errorf("the query is longer than %d bytes", MaxDiscoveryRequestLen)
	}
	var out []string
	for part := range strings.SplitSeq(raw, "&") {
		k, v, _ := strings.Cut(part, "=")
		if k != "supports" {
			continue
		}
		v, err := url.QueryUnescape(v)
		if err != nil {
			return nil, fmt.Errorf("the supports parameter is not URL-encoded correctly: %w", err)
		}
		for name := range strings.SplitSeq(v, ",") {
			if err := addSupport(&out, name); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// ParseDiscoveryBody reads a discovery POST's JSON body {"supports":[…]} of at
// most MaxDiscoveryRequestLen bytes, sent with contentType; other fields are
// ignored.
func ParseDiscoveryBody(contentType string, r io.Reader) ([]string, error) {
	if mt, _, err := mime.ParseMediaType(contentType); err != nil || mt != "application/json" {
		return nil, fmt.Errorf("a POST's body must be application/json, {\"supports\":[\"quic\",\"tls\"]}")
	}
	body, err := io.ReadAll(io.LimitReader(r, MaxDiscoveryRequestLen+1))
	if err != nil {
		return nil, fmt.Errorf("reading the body: %w", err)
	}
	if len(body) > MaxDiscoveryRequestLen {
		return nil, fmt.Errorf("the body is longer than %d bytes", MaxDiscoveryRequestLen)
	}
	var req struct {
		Supports []string `json:"supports"`
	}
	dec := json.NewDecoder(strings.NewReader(string(body)))
	if err := dec.Decode(&req); err != nil {
		return nil, fmt.Errorf("the body is not a JSON object {\"supports\":[…]}: %w", err)
	}
	if dec.More() {
		return nil, fmt.Errorf("bytes after the JSON object")
	}
	var out []string
	for _, name := range req.Supports {
		if err := addSupport(&out, name); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func addSupport(out *[]string, name string) error {
	name = strings.ToLower(strings.TrimSpace(name))
	switch {
	case name == "":
		return nil
	case len(name) > MaxDiscoveryNameLen:
		return fmt.Errorf("a transport name is longer than %d bytes", MaxDiscoveryNameLen)
	case len(*out) >= MaxDiscoverySupports:
		return fmt.Errorf("more than %d transport names", MaxDiscoverySupports)
	}
	*out = append(*out, name)
	return nil
}
