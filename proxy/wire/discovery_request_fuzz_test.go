package wire_test

import (
	"strings"
	"testing"

	"github.com/tp-proxy/tp/proxy/wire"
)

// FuzzDiscoverySupports: the discovery request's query and POST body come
// from anyone. Whatever they hold, parsing must not panic, and what it
// accepts stays within the documented bounds (docs/HTTP.md §3.1): at most
// wire.MaxDiscoverySupports names of at most wire.MaxDiscoveryNameLen bytes,
// lower case, none empty.
func FuzzDiscoverySupports(f *testing.F) {
	for _, seed := range []string{"supports=quic,tls", "supports=QUIC&supports=tls&x=1", "supports=%zz", "supports=,,,",
		`{"supports":["quic","tls"]}`, `{"supports":["quic"]}{}`, `{"supports":[1]}`, strings.Repeat("supports=a&", 20)} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		check := func(what string, names []string, err error) {
			if err != nil {
				if err.Error() == "" {
					t.Fatalf("%s %q: an empty error", what, in)
				}
				return
			}
			if len(names) > wire.MaxDiscoverySupports {
				t.Fatalf("%s %q: %d names accepted", what, in, len(names))
			}
			for _, n := range names {
				if n == "" || len(n) > wire.MaxDiscoveryNameLen || n != strings.ToLower(n) {
					t.Fatalf("%s %q: name %q accepted", what, in, n)
				}
			}
		}
		names, err := wire.ParseDiscoveryQuery(in)
		check("query", names, err)
		names, err = wire.ParseDiscoveryBody("application/json", strings.NewReader(in))
		check("body", names, err)
	})
}
