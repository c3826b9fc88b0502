package proxy

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// The target comes from the request's path by the template: percent-decoded,
// an IPv6 literal with encoded colons, the configured template too; anything
// else is a 400 that says what was wrong.
func TestConnectUDPHello(t *testing.T) {
	t.Parallel()
	const custom = "https://proxy.example/masque?h={target_host}&p={target_port}"
	for _, tc := range []struct {
		name, target, host, err string
		port                    int
	}{
		{name: "IPv4", target: "/.well-known/masque/udp/192.0.2.6/443/", host: "192.0.2.6", port: 443},
		{name: "DNS name", target: "/.well-known/masque/udp/dns.example/53/", host: "dns.example", port: 53},
		{name: "IPv6, colons encoded", target: "/.well-known/masque/udp/2001%3Adb8%3A%3A42/53/", host: "2001:db8::42", port: 53},
		{name: "configured template", target: "/masque?h=dns.example&p=53", host: "dns.example", port: 53},
		{name: "no trailing slash", target: "/.well-known/masque/udp/dns.example/53", err: "does not match"},
		{name: "extra segment", target: "/.well-known/masque/udp/a/b/53/", err: "does not match"},
		{name: "port 0", target: "/.well-known/masque/udp/dns.example/0/", err: "target_port"},
		{name: "port too large", target: "/.well-known/masque/udp/dns.example/65536/", err: "target_port"},
		{name: "signed port", target: "/.well-known/masque/udp/dns.example/+53/", err: "target_port"},
		{name: "empty host", target: "/.well-known/masque/udp//53/", err: "target_host"},
		{name: "IPv6 with zone", target: "/.well-known/masque/udp/fe80%3A%3A1%25eth0/53/", err: "target_host"},
		{name: "colon but not IPv6", target: "/.well-known/masque/udp/a%3Ab/53/", err: "target_host"},
		{name: "bad escape", target: "/.well-known/masque/udp/a%zz/53/", err: "does not match"},
		{name: "query value twice", target: "/masque?h=a&h=b&p=53", err: "does not match"},
	} {
		u, err := url.ParseRequestURI(tc.target)
		if err != nil {
			if tc.err != "" {
				continue // net/http refuses it before the handler
			}
			t.Fatalf("%s: %v", tc.name, err)
		}
		r := &http.Request{Method: http.MethodConnect, ProtoMajor: 3, URL: u, Header: http.Header{}}
		h, herr := connectUDPHello(r, ConnectUDPOptions{Template: custom})
		switch {
		case tc.err == "" && herr != nil:
			t.Errorf("%s: %v", tc.name, herr)
		case tc.err == "" && (h.Host != tc.host || h.Port != tc.port || h.Net != "udp"):
			t.Errorf("%s: %+v; want %s port %d udp", tc.name, h, tc.host, tc.port)
		case tc.err != "" && (herr == nil || !strings.Contains(herr.Reason, tc.err)):
			t.Errorf("%s: %v; want a refusal naming %q", tc.name, herr, tc.err)
		}
	}
	// HTTP/1.1 asks with GET (RFC 9298 §3.2); Capsule-Protocol, when sent, is ?1.
	u, _ := url.ParseRequestURI("/.well-known/masque/udp/dns.example/53/")
	if _, herr := connectUDPHello(&http.Request{Method: http.MethodPost, ProtoMajor: 1, URL: u, Header: http.Header{}}, ConnectUDPOptions{}); herr == nil || !strings.Contains(herr.Reason, "GET") {
		t.Errorf("HTTP/1.1 POST: %v; want a refusal naming GET", herr)
	}
	if _, herr := connectUDPHello(&http.Request{Method: http.MethodConnect, ProtoMajor: 2, URL: u, Header: http.Header{"Capsule-Protocol": {"?0"}}}, ConnectUDPOptions{}); herr == nil {
		t.Error("Capsule-Protocol ?0 was accepted")
	}
}

// Templates TP cannot match are refused when the server is built.
func TestConnectUDPTemplateValidate(t *testing.T) {
	t.Parallel()
	for _, bad := range []string{"masque/{target_host}/{target_port}", "/m/{target_host}", "/m/x{target_host}/{target_port}", "/m/{target_host}/{target_port}/{target_port}", "https://example.org"} {
		if err := (ConnectUDPOptions{Template: bad}).Validate(); err == nil {
			t.Errorf("template %q was accepted", bad)
		}
	}
	for _, good := range []string{"/m/{target_host}/{target_port}", "https://p.example:443/q?a=1&h={target_host}&p={target_port}"} {
		if err := (ConnectUDPOptions{Template: good}).Validate(); err != nil {
			t.Errorf("template %q: %v", good, err)
		}
	}
}

// FuzzConnectUDPHello: whatever the path and query, the hello is refused or
// names a host and a port in range, never panics.
func FuzzConnectUDPHello(f *testing.F) {
	f.Add("/.well-known/masque/udp/192.0.2.6/443/")
	f.Add("/masque?h=%3A%3A1&p=53")
	f.Add("/.well-known/masque/udp/%25%25/1/")
	f.Fuzz(func(t *testing.T, target string) {
		u, err := url.ParseRequestURI(target)
		if err != nil {
			return
		}
		r := &http.Request{Method: http.MethodConnect, ProtoMajor: 3, URL: u, Header: http.Header{}}
		h, herr := connectUDPHello(r, ConnectUDPOptions{Template: "/masque?h={target_host}&p={target_port}"})
		if herr == nil && (h.Host == "" || h.Port < 1 || h.Port > 65535 || h.Net != "udp") {
			t.Fatalf("%q gave %+v", target, h)
		}
	})
}
