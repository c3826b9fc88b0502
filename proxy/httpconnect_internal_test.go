package proxy

import (
	"net/http"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/proxy/reverse"
)

// Proxy-Status is a valid Structured Field whatever the reason holds: the bad
// inputs are a quote, a backslash, a newline (header injection) and non-ASCII.
func TestProxyStatusEscapes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, details, want string }{
		{"proxy.example.org", "plain", `proxy.example.org; error=http_request_denied; details="plain"`},
		{"proxy.example.org", `say "no" \ now`, `proxy.example.org; error=http_request_denied; details="say \"no\" \\ now"`},
		{"proxy.example.org", "line\r\nX-Injected: 1", `proxy.example.org; error=http_request_denied; details="line??X-Injected: 1"`},
		{"proxy.example.org", "caf\u00e9", `proxy.example.org; error=http_request_denied; details="caf??"`},
		{"1proxy.example.org", "x", `"1proxy.example.org"; error=http_request_denied; details="x"`},
	} {
		if got := proxyStatus(tc.name, "http_request_denied", tc.details); got != tc.want {
			t.Errorf("proxyStatus(%q, %q) = %s; want %s", tc.name, tc.details, got, tc.want)
		}
	}
	long := proxyStatus("p.example", "x", strings.Repeat("a", 5000))
	if len(long) > maxProxyStatusDetails+100 || !strings.HasSuffix(long, `..."`) {
		t.Errorf("a 5000-byte reason gave a %d-byte Proxy-Status without a mark that it was shortened", len(long))
	}
}

// The CONNECT target is host:port with a port of 1 to 65535.
func TestConnectHello(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		host string
		ok   bool
	}{
		{"example.org:443", true},
		{"[::1]:22", true},
		{"example.org", false},
		{"example.org:", false},
		{":443", false},
		{"example.org:0", false},
		{"example.org:65536", false},
		{"example.org:+443", false},
		{strings.Repeat("a", 254) + ":443", false},
	} {
		h, herr := connectHello(&http.Request{Host: tc.host})
		if (herr == nil) != tc.ok {
			t.Errorf("CONNECT %q: %v; want ok=%t", tc.host, herr, tc.ok)
		}
		if herr == nil && (h.Op != "dial" || h.Net != "tcp" || h.Port == 0) {
			t.Errorf("CONNECT %q gave hello %+v", tc.host, h)
		}
	}
}

// Requests on a proxy name are routed by method and :protocol (h2 gives it
// as a header, quic-go's h3 as Proto) and Upgrade.
func TestProxyRouting(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		r       *http.Request
		reverse bool
		proto   string
	}{
		{"plain CONNECT", &http.Request{Method: "CONNECT", ProtoMajor: 1, Header: http.Header{}}, false, ""},
		{"h3 CONNECT", &http.Request{Method: "CONNECT", ProtoMajor: 3, Proto: "HTTP/3.0", Header: http.Header{}}, false, ""},
		{"h2 extended CONNECT reverse", &http.Request{Method: "CONNECT", ProtoMajor: 2, Header: http.Header{":protocol": {"reverse"}}}, true, "reverse"},
		{"h3 extended CONNECT reverse", &http.Request{Method: "CONNECT", ProtoMajor: 3, Proto: "reverse", Header: http.Header{}}, true, "reverse"},
		{"h3 extended CONNECT websocket", &http.Request{Method: "CONNECT", ProtoMajor: 3, Proto: "websocket", Header: http.Header{}}, false, "websocket"},
		{"HTTP/1.1 Upgrade: reverse", &http.Request{Method: "GET", ProtoMajor: 1, Header: http.Header{"Upgrade": {"foo, reverse"}}}, true, ""},
		{"h2 GET with Upgrade (not allowed in h2)", &http.Request{Method: "GET", ProtoMajor: 2, Header: http.Header{"Upgrade": {"reverse"}}}, false, ""},
	} {
		if got := reverse.IsReverseTunnel(tc.r); got != tc.reverse {
			t.Errorf("%s: reverse tunnel %t; want %t", tc.name, got, tc.reverse)
		}
		if got := connectProtocol(tc.r); got != tc.proto {
			t.Errorf("%s: :protocol %q; want %q", tc.name, got, tc.proto)
		}
	}
}
