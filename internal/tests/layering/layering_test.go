package layering

import (
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"strings"
	"testing"
)

const mod = "github.com/tp-proxy/tp/"

// rule forbids packages (by prefix) in the dependencies of some of TP's packages.
type rule struct {
	why       string
	roots     []string // TP packages, relative to the module
	forbidden []string // import path prefixes; a prefix ending in "/" matches below it, otherwise exactly
}

var rules = []rule{{
	why:   "tp and dlogin run once per ssh connection and on people's laptops: they carry no server, no policy engine and no CA",
	roots: []string{"cmd/tp", "cmd/dlogin", "clients", "acme/login", "proxy/wire", "authz"},
	forbidden: []string{
		"github.com/open-policy-agent/",
		"github.com/smallstep/certificates/",
		"github.com/smallstep/nosql",
		"go.step.sm/",  // step's crypto packages pull its certificate templates (sprig, semver, x/crypto/ssh)
		mod + "proxy",  // the server side of the data plane; the wire package is what both ends share
		mod + "proxy/", // and its protocol families (the wire and mux packages are allowed)
		mod + "internal/server/tpd",
		mod + "internal/server/admin",
		mod + "internal/server/users",
		mod + "policy",
		mod + "acme", // the CA; acme/login, the client side, is allowed
	},
}, {
	why:       "configuration stays in cmd/ and internal/lib/config: the data plane, the clients and the wire package take their parts from callers",
	roots:     []string{"proxy", "proxy/carrier", "proxy/masque", "proxy/peer", "proxy/reverse", "proxy/wire", "clients", "authz", "policy"},
	forbidden: []string{"github.com/spf13/viper", "github.com/spf13/cobra", mod + "internal/lib/config"},
}, {
	why:       "the data plane knows nothing of OPA or step-ca: the caller hands it an authz.Authorizer",
	roots:     []string{"proxy", "proxy/carrier", "proxy/masque", "proxy/peer", "proxy/reverse"},
	forbidden: []string{"github.com/open-policy-agent/", "github.com/smallstep/certificates/", mod + "policy", mod + "acme"},
}, {
	why:       "metrics are tpd's business: the data plane keeps plain counters (proxy.Server.Stats) that tpd exports, and the clients export nothing",
	roots:     []string{"proxy", "proxy/carrier", "proxy/masque", "proxy/peer", "proxy/reverse", "proxy/wire", "authz", "cmd/tp", "cmd/dlogin", "clients"},
	forbidden: []string{"github.com/prometheus/"},
}, {
	why:       "the wire package is the protocol both ends speak: it depends on no other TP package",
	roots:     []string{"proxy/wire"},
	forbidden: []string{mod},
}, {
	why:       "the multiplexer is shared by both ends as the wire package is: it depends on no other TP package but the wire package",
	roots:     []string{"proxy/mux"},
	forbidden: []string{mod + "proxy", mod + "clients", mod + "internal/", mod + "authz", mod + "policy", mod + "acme"},
}, {
	why:       "the carriers move QUIC packets and the peer transport moves sessions between instances; neither decides anything: they depend on no TP package but the wire package, so the proxy assembles them and not the other way round",
	roots:     []string{"proxy/carrier", "proxy/peer"},
	forbidden: []string{mod},
}, {
	why:       "the protocol families under proxy/ are assembled by proxy: none imports proxy or another family",
	roots:     []string{"proxy/carrier", "proxy/masque", "proxy/peer", "proxy/reverse"},
	forbidden: []string{mod + "proxy", mod + "proxy/carrier", mod + "proxy/masque", mod + "proxy/peer", mod + "proxy/reverse", mod + "clients", mod + "internal/server/tpd", mod + "internal/lib/config"},
}, {
	why:       "the client transport is how a stream to tpd is obtained: it knows no feature, so it imports no clients package above it (clients, with the dialer, the requests and the features)",
	roots:     []string{"clients/transport"},
	forbidden: []string{mod + "clients", mod + "internal/lib/tun"},
}}

var libs = []string{"internal/lib/atomicfile", "internal/lib/cli", "internal/lib/config", "internal/lib/ephemeral", "internal/lib/fileperm", "internal/lib/tun", "internal/lib/version", "internal/lib/xconnect"}

func init() {
	rules = append(rules, rule{
		why: "the programs people run and the libraries they are made of carry no test harness, whole-system test or benchmark code",
		roots: []string{"cmd/tpd", "cmd/tp", "cmd/dlogin", "clients", "clients/transport", "proxy", "proxy/wire", "proxy/mux",
			"proxy/carrier", "proxy/masque", "proxy/peer", "proxy/reverse", "authz", "policy", "acme", "internal/server/tpd"},
		forbidden: []string{mod + "internal/testkit/", mod + "internal/tests/", mod + "internal/bench"},
	}, rule{
		why:   "internal/lib holds utilities: they lean on no TP package outside internal/lib, so that any part may use them",
		roots: libs,
		forbidden: []string{mod + "cmd/", mod + "proxy", mod + "proxy/", mod + "clients", mod + "clients/",
			mod + "authz", mod + "policy", mod + "acme", mod + "acme/", mod + "internal/server/", mod + "internal/bench",
			mod + "internal/testkit/", mod + "internal/tests/"},
	}, rule{
		why:       "the server's assembly (internal/server) is tpd's: the client programs link none of it",
		roots:     []string{"cmd/tp", "cmd/dlogin", "clients", "acme/login"},
		forbidden: []string{mod + "internal/server/"},
	})
}

type pkg struct {
	ImportPath string
	Imports    []string
}

// graph returns the import graph of root's dependencies (go list -deps).
func graph(t *testing.T, root string) map[string][]string {
	t.Helper()
	cmd := exec.Command("go", "list", "-deps", "-json=ImportPath,Imports", root)
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("go list -deps %s: %v\n%s", root, err, ee.Stderr)
		}
		t.Fatalf("go list -deps %s: %v", root, err)
	}
	g := make(map[string][]string)
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("go list -deps %s: %v", root, err)
		}
		g[p.ImportPath] = p.Imports
	}
	return g
}

// matches reports whether path is forbidden by prefix.
func matches(path, prefix string) bool {
	if strings.HasSuffix(prefix, "/") {
		return strings.HasPrefix(path, prefix)
	}
	return path == prefix
}

// nearest is the shortest import chain in g from root to a package bad accepts,
// or nil when root links none.
func nearest(g map[string][]string, root string, bad func(string) bool) []string {
	prev := map[string]string{root: ""}
	queue := []string{root}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if bad(p) {
			var c []string
			for ; p != ""; p = prev[p] {
				c = append([]string{p}, c...)
			}
			return c
		}
		for _, q := range g[p] {
			if _, seen := prev[q]; !seen {
				prev[q] = p
				queue = append(queue, q)
			}
		}
	}
	return nil
}

// TestLayers checks each rule against the real import graph and names the chain
// that breaks it.
func TestLayers(t *testing.T) {
	graphs := make(map[string]map[string][]string)
	for _, r := range rules {
		for _, rel := range r.roots {
			root := mod + rel
			g, ok := graphs[root]
			if !ok {
				g = graph(t, root)
				graphs[root] = g
			}
			if len(g) == 0 {
				t.Fatalf("go list -deps %s listed nothing", root)
			}
			for _, f := range r.forbidden {
				if c := nearest(g, root, func(dep string) bool { return dep != root && matches(dep, f) && !allowed(rel, dep) }); c != nil {
					t.Errorf("%s links %s, but %s:\n\t%s", rel, f, r.why, strings.Join(c, "\n\t→ "))
				}
			}
		}
	}
}

// allowed lists the exceptions to a prefix: acme/login is the client side of
// acme, and the wire package is the shared half of proxy.
func allowed(root, dep string) bool {
	switch dep {
	case mod + "acme/login", mod + "proxy/wire":
		return root != "proxy/wire"
	case mod + "proxy/mux":
		return root != "proxy/wire"
	}
	return false
}

// TestChainNamesTheImports: the chain the failure message prints is the real
// path through the graph, so a person can see which import to cut.
func TestChainNamesTheImports(t *testing.T) {
	g := map[string][]string{"a": {"b", "c"}, "b": {"d"}, "c": {"e"}, "e": {"d"}}
	is := func(want string) func(string) bool { return func(p string) bool { return p == want } }
	if got := strings.Join(nearest(g, "a", is("d")), " "); got != "a b d" {
		t.Fatalf("chain a→d = %q, want the shortest, a b d", got)
	}
	if c := nearest(g, "d", is("a")); c != nil {
		t.Fatalf("chain d→a = %v, want none", c)
	}
}
