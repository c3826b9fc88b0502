package tpd

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/proxy/wire"
)

// discoveryMaxAge is how long a client or a cache may keep a discovery
// document: the transports change only with tpd's configuration.
const discoveryMaxAge = 300

// discoveryOptions are what the discovery document says about this tpd.
type discoveryOptions struct {
	QUIC        bool     // tp/1 over QUIC (and HTTP/3) on the public port's UDP side
	ProxyNames  []string // names that serve the HTTPS proxy (CONNECT, reverse tunnels)
	ReverseZone string   // "" when reverse listeners are off
	PublicPorts []config.PortRange
	ConnectUDP  string // CONNECT-UDP template: a path on the proxy name, or a URL
}

// discoveryFor reads cfg's part of the document.
func discoveryFor(cfg config.Server, proxyNames []string) discoveryOptions {
	ports, _ := config.ParsePortRanges(cfg.PublicPorts) // validated at start
	return discoveryOptions{QUIC: cfg.QUIC, ProxyNames: proxyNames, ReverseZone: cfg.ReverseZone, PublicPorts: ports,
		ConnectUDP: cfg.ConnectUDPTemplate}
}

// discoveryHandler answers GET, HEAD and POST on wire.DiscoveryPath with the
// transport discovery document (docs/HTTP.md, section 3): no authentication,
// nothing secret, the same for everyone who uses the same host and port. A GET
// may say which transports the client supports (?supports=quic,tls, or the
// parameter repeated); a POST says it in a JSON body {"supports":[…]}. Other
// query parameters and unknown transport names are ignored.
type discoveryHandler struct{ o discoveryOptions }

var _ http.Handler = discoveryHandler{}

func (h discoveryHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != wire.DiscoveryPath {
		http.NotFound(w, r)
		return
	}
	var supports []string
	var err error
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		supports, err = wire.ParseDiscoveryQuery(r.URL.RawQuery)
		w.Header().Set("Cache-Control", fmt.Sprintf("public, max-age=%d", discoveryMaxAge))
	case http.MethodPost:
		supports, err = wire.ParseDiscoveryBody(r.Header.Get("Content-Type"), r.Body)
		w.Header().Set("Cache-Control", "no-store")
	default:
		w.Header().Set("Allow", "GET, HEAD, POST")
		http.Error(w, "405 Method Not Allowed: the discovery document answers GET, HEAD and POST.", http.StatusMethodNotAllowed)
		return
	}
	if err != nil {
		http.Error(w, "400 Bad Request: "+err.Error(), http.StatusBadRequest)
		return
	}
	doc := h.document(r.Host)
	if t, ok := doc.Choose(supports); ok {
		doc.Chosen = &t
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		http.Error(w, "500 Internal Server Error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if r.Method == http.MethodHead {
		return
	}
	_, _ = w.Write(append(b, '\n'))
}

// document is the document for a client that reached tpd as hostport (the
// Host header): the transports' host and port are the ones it used, so they
// are right behind a port mapping that maps TCP and UDP alike, as Alt-Svc is.
func (h discoveryHandler) document(hostport string) wire.Discovery {
	host, port := splitHostPort(hostport)
	doc := wire.Discovery{
		Schema: wire.DiscoverySchema, Software: "tpd", Version: Version,
		ALPN: wire.ALPN, ProtocolVersions: []int{wire.Version},
		Transports: []wire.DiscoveredTransport{},
	}
	tp := []string{wire.ALPN}
	if h.o.QUIC {
		doc.Transports = append(doc.Transports, wire.DiscoveredTransport{Name: wire.DiscoverQUIC, Network: "udp",
			Host: host, Port: port, ALPN: tp, Auth: wire.AuthDeviceCertificate})
	}
	doc.Transports = append(doc.Transports, wire.DiscoveredTransport{Name: wire.DiscoverTLS, Network: "tcp",
		Host: host, Port: port, ALPN: tp, Auth: wire.AuthDeviceCertificate})
	if h.o.QUIC { // the carriers feed the QUIC server
		doc.Transports = append(doc.Transports,
			wire.DiscoveredTransport{Name: wire.DiscoverCarrierTLS, Network: "tcp",
				Host: host, Port: port, ALPN: []string{wire.ALPNCarrier}, Auth: wire.AuthDeviceCertificate},
			wire.DiscoveredTransport{Name: wire.DiscoverCarrierWS, Network: "tcp",
				Host: host, Port: port, ALPN: []string{"http/1.1"}, Auth: wire.AuthDeviceCertificate,
				URL: "wss://" + net.JoinHostPort(host, strconv.Itoa(port)) + wire.CarrierWSPath},
			wire.DiscoveredTransport{Name: wire.DiscoverCarrierHTTP, Network: "tcp",
				Host: host, Port: port, ALPN: []string{"h2", "http/1.1"}, Auth: wire.AuthDeviceCertificate,
				URL: "https://" + net.JoinHostPort(host, strconv.Itoa(port)) + wire.CarrierHTTPPath})
	}
	proxyHost := h.proxyName(host)
	if proxyHost != "" {
		url := "https://" + net.JoinHostPort(proxyHost, strconv.Itoa(port))
		doc.Transports = append(doc.Transports, wire.DiscoveredTransport{Name: wire.DiscoverConnect, Network: "tcp",
			Host: proxyHost, Port: port, ALPN: []string{"h2", "http/1.1"}, Auth: wire.AuthDeviceCertificate, URL: url})
		if h.o.QUIC {
			doc.Transports = append(doc.Transports, wire.DiscoveredTransport{Name: wire.DiscoverConnectH3, Network: "udp",
				Host: proxyHost, Port: port, ALPN: []string{"h3"}, Auth: wire.AuthDeviceCertificate, URL: url})
		}
		doc.ConnectUDP = connectUDPTemplate(url, h.o.ConnectUDP) // masque_udp.go
	}
	if h.o.ReverseZone != "" {
		rev := &wire.DiscoveredReverse{Zone: h.o.ReverseZone, PublicPorts: []wire.DiscoveredPorts{}}
		if proxyHost != "" {
			base := "https://" + net.JoinHostPort(proxyHost, strconv.Itoa(port))
			rev.HTTP = base + wire.DiscoveryPath + "/reverse-http/{label}"
			rev.ListenTCP = base + "/.well-known/listen-tcp/{addr}/{port}/"
		}
		for _, p := range h.o.PublicPorts {
			rev.PublicPorts = append(rev.PublicPorts, wire.DiscoveredPorts{Lo: p.Lo, Hi: p.Hi, Net: p.Net})
		}
		doc.Reverse = rev
	}
	return doc
}

// proxyName is the proxy name to advertise: host itself when the client asked
// on a proxy name, else the first proxy name; "" when there is none.
func (h discoveryHandler) proxyName(host string) string {
	for _, n := range h.o.ProxyNames {
		if strings.EqualFold(strings.TrimSuffix(n, "."), host) {
			return n
		}
	}
	if len(h.o.ProxyNames) > 0 {
		return h.o.ProxyNames[0]
	}
	return ""
}

// splitHostPort splits a Host header; without a port it is HTTPS's 443.
func splitHostPort(hostport string) (string, int) {
	host, p, err := net.SplitHostPort(hostport)
	if err != nil {
		host, p = strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]"), ""
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 1 || port > 65535 {
		port = 443
	}
	return strings.TrimSuffix(strings.ToLower(host), "."), port
}

// ProxyHTTP is the handler for plain requests on the proxy names
// (proxy.Config.ProxyHTTP): the discovery document at wire.DiscoveryPath,
// 404 for anything else.
func (d *Daemon) ProxyHTTP() http.Handler {
	mux := http.NewServeMux()
	mux.Handle(wire.DiscoveryPath, d.discovery)
	return mux
}
