package testnet_test

import (
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// In its namespace the test has lo up with the addresses it asked for, an IPv6
// one usable at once (bound before the kernel's duplicate address detection
// could have run), and no other interface of the host's.
func TestInNetns(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t, "10.9.8.1/32", "100::1/64") {
		return
	}
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	if len(ifs) != 1 || ifs[0].Name != "lo" || ifs[0].Flags&net.FlagUp == 0 {
		t.Fatalf("interfaces in the namespace: %v, want lo alone, up", ifs)
	}
	for _, addr := range []string{"10.9.8.1:0", "[100::1]:0", "127.0.0.1:0"} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("listen on %s in the namespace: %v", addr, err)
		}
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatalf("dial %s in the namespace: %v", ln.Addr(), err)
		}
		c.Close()
		ln.Close()
	}
}

// failInNetnsEnv makes TestInNetnsFailsWithItsRun the subject of itself: run
// with it, the test fails in its namespace on purpose.
const failInNetnsEnv = "TP_TESTNET_FAIL_IN_NETNS"

// A test that fails in its namespace fails in the caller's run too, which says
// so: InNetns's caller cannot pass for a run that did not. The test runs itself
// as the subject (failInNetnsEnv), which fails in its namespace on purpose.
func TestInNetnsFailsWithItsRun(t *testing.T) {
	if os.Getenv(failInNetnsEnv) != "" {
		if testnet.InNetns(t) {
			t.Fatal("failed in the namespace on purpose")
		}
		return
	}
	t.Parallel()
	if testing.Short() {
		t.Skip("starts a process that starts one in a namespace; skipped under -short")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestInNetnsFailsWithItsRun$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), failInNetnsEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("the caller's run passed although the namespace's failed:\n%s", out)
	}
	for _, want := range []string{"failed in the namespace on purpose", "the test failed in a network namespace of its own"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the caller's output lacks %q:\n%s", want, out)
		}
	}
}
