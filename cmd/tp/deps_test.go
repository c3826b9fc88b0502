package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestClientLinksNoServer: tp runs once per ssh connection as a ProxyCommand, so
// it must not link the server: neither tpd's assembly nor step-ca's CA packages.
// It once imported internal/tpd for a version string, which doubled its size and
// its start-up work.
func TestClientLinksNoServer(t *testing.T) {
	for _, pkg := range []string{"github.com/tp-proxy/tp/cmd/tp", "github.com/tp-proxy/tp/cmd/dlogin"} {
		out, err := exec.Command("go", "list", "-deps", pkg).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", pkg, err)
		}
		for _, dep := range strings.Fields(string(out)) {
			if dep == "github.com/tp-proxy/tp/internal/tpd" || strings.HasPrefix(dep, "github.com/smallstep/certificates/") {
				t.Errorf("%s links %s, server code", pkg, dep)
			}
		}
	}
}
