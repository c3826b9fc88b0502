package proxy

import (
	"net"
	"net/http"
	"strconv"
	"testing"

	"github.com/tp-proxy/tp/proxy/wire"
)

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
