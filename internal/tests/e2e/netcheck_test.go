package e2e

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// tp netcheck asks the real tpd, over STUN on its QUIC port, which address
// this device's UDP comes from: on loopback, its own, so no NAT. Bad input: a
// profile whose server serves no UDP on its port (an HTTPS port of nothing
// but TCP) gets a non-zero exit and a sentence that says UDP got no answer and
// what tp does then.
func TestNetcheck(t *testing.T) {
	parallel(t)
	s := startServer(t, testPolicy)
	alice := s.login(t, "alice", "laptop", "dev")
	out := run(t, alice, binary("tp"), "netcheck")
	t.Logf("tp netcheck:\n%s", out)
	for _, want := range []string{"UDP:        works; the server sees this device at 127.0.0.1:", "NAT:        none"} {
		if !strings.Contains(out, want) {
			t.Fatalf("tp netcheck does not say %q:\n%s", want, out)
		}
	}

	// The same device pointed at a port where nothing answers UDP.
	home := strings.TrimPrefix(alice[len(alice)-1], "TP_HOME=")
	if !strings.HasPrefix(alice[len(alice)-1], "TP_HOME=") {
		t.Fatalf("alice's environment does not end with TP_HOME: %q", alice)
	}
	other := filepath.Join(t.TempDir(), "tp-home")
	if err := os.CopyFS(other, os.DirFS(home)); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(other, "profile.json")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0") // a TCP port, and nothing on UDP
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if !strings.Contains(string(b), s.Addr) {
		t.Fatalf("the profile does not name the server %s:\n%s", s.Addr, b)
	}
	b = []byte(strings.Replace(string(b), s.Addr, ln.Addr().String(), 1))
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	expectFail(t, []string{"TP_HOME=" + other}, "a server port with no UDP", []string{"gets no answer", "over TLS instead"}, binary("tp"), "netcheck")
}
