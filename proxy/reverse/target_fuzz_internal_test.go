package reverse

import (
	"strconv"
	"strings"
	"testing"
)

// FuzzTunnelTarget: a reverse tunnel's URI path comes from the network.
// Whatever it holds, ParseTarget must not panic; a refusal is a 4xx with a
// reason, and what it accepts is one valid label under the zone or a port in
// 1-65535 on an address where TP listens.
func FuzzTunnelTarget(f *testing.F) {
	for _, seed := range []string{
		"/.well-known/tp/reverse-http/blog", "/.well-known/tp/reverse-http/Blog/", "/.well-known/tp/reverse-http/a.b",
		"/.well-known/listen-tcp/0.0.0.0/25/", "/.well-known/listen-tcp/[::]/25/", "/.well-known/reverse/tcp/*/2525/",
		"/.well-known/listen-tcp/192.0.2.1/+25/", "/.well-known/listen-tcp/0.0.0.0/0x19/", "/.well-known/listen-tcp//25/",
		"/.well-known/listen-tcp/0.0.0.0/25", "/other", "",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, path string) {
		got, ref := ParseTarget(path, "rev.test", "192.0.2.1")
		if ref != nil {
			if ref.Status < 400 || ref.Status > 499 || ref.Reason == "" || ref.Code == "" {
				t.Fatalf("%q: refusal %+v; want a 4xx with a code and a reason", path, ref)
			}
			return
		}
		if got.Port != 0 {
			if got.Port < 1 || got.Port > 65535 || got.Label != "" || !listenHostOK(got.Addr, "192.0.2.1") || got.Key() != "tcp/"+strconv.Itoa(got.Port) {
				t.Fatalf("%q accepted as %+v", path, got)
			}
			return
		}
		if !validLabel(got.Label) || got.Full != got.Label+".rev.test" || strings.ContainsAny(got.Label, "./%") {
			t.Fatalf("%q accepted as %+v", path, got)
		}
	})
}
