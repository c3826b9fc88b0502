package proxy

import (
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/proxy/wire"
)

// FuzzTunnelTarget: a reverse tunnel's URI path comes from the network.
// Whatever it holds, parseTarget must not panic; a refusal is a 4xx with a
// reason, and what it accepts is one valid label under the zone or a port in
// 1-65535 on an address where TP listens.
func FuzzTunnelTarget(f *testing.F) {
	s := &Server{rev: newReverseRegistry(ReverseOptions{Zone: "rev.test", PublicHost: "192.0.2.1"})}
	for _, seed := range []string{
		"/.well-known/tp/reverse-http/blog", "/.well-known/tp/reverse-http/Blog/", "/.well-known/tp/reverse-http/a.b",
		"/.well-known/listen-tcp/0.0.0.0/25/", "/.well-known/listen-tcp/[::]/25/", "/.well-known/reverse/tcp/*/2525/",
		"/.well-known/listen-tcp/192.0.2.1/+25/", "/.well-known/listen-tcp/0.0.0.0/0x19/", "/.well-known/listen-tcp//25/",
		"/.well-known/listen-tcp/0.0.0.0/25", "/other", "",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, path string) {
		got, ref := s.parseTarget(path)
		if ref != nil {
			if ref.status < 400 || ref.status > 499 || ref.reason == "" || ref.code == "" {
				t.Fatalf("%q: refusal %+v; want a 4xx with a code and a reason", path, ref)
			}
			return
		}
		if got.port != 0 {
			if got.port < 1 || got.port > 65535 || got.label != "" || !s.listenHostOK(got.addr) || got.key() != "tcp/"+strconv.Itoa(got.port) {
				t.Fatalf("%q accepted as %+v", path, got)
			}
			return
		}
		if !validLabel(got.label) || got.full != got.label+".rev.test" || strings.ContainsAny(got.label, "./%") {
			t.Fatalf("%q accepted as %+v", path, got)
		}
	})
}

// FuzzConnectHello: a CONNECT's authority comes from the network. Whatever it
// holds, connectHello must not panic; a refusal is bad_request with a bounded
// reason, and what it accepts is a dial of a non-empty host no longer than
// wire.MaxHostLen to a port in 1-65535 that writes back to the same authority.
func FuzzConnectHello(f *testing.F) {
	for _, seed := range []string{"example.org:443", "[::1]:22", "127.0.0.1:0", "a:+1", "a:0x1", "a:65536", ":443", "example.org", "[::1]", "a:b:c", "a:00443"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, authority string) {
		h, herr := connectHello(&http.Request{Method: http.MethodConnect, Host: authority})
		if herr != nil {
			if herr.Code != wire.CodeBadRequest || herr.Reason == "" || len(herr.Reason) > 600 { // 80 bytes of the authority, quoted
				t.Fatalf("%q: refusal %+v; want bad_request with a bounded reason", authority, herr)
			}
			return
		}
		if h.Op != wire.OpDial || h.Net != "tcp" || h.Host == "" || len(h.Host) > wire.MaxHostLen || h.Port < 1 || h.Port > 65535 {
			t.Fatalf("%q accepted as %+v", authority, h)
		}
		host, port, err := net.SplitHostPort(authority)
		if err != nil || host != h.Host {
			t.Fatalf("%q accepted as host %q, which its authority does not say (%q, %v)", authority, h.Host, host, err)
		}
		if p, err := strconv.Atoi(port); err != nil || p != h.Port {
			t.Fatalf("%q accepted as port %d", authority, h.Port)
		}
	})
}
