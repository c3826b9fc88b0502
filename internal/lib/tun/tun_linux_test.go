//go:build linux

package tun

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// Without CAP_NET_ADMIN in the network namespace's owner (here: in a user
// namespace of its own, unshare -r, which keeps the host's network
// namespace), Open says what is missing and how to grant it.
func TestOpenWithoutCapNetAdminSaysSo(t *testing.T) {
	if os.Getenv("TP_TUN_NO_CAP") == "1" {
		_, err := Open("tpnocap%d")
		if err == nil || !strings.Contains(err.Error(), "needs CAP_NET_ADMIN") {
			t.Fatalf("Open without CAP_NET_ADMIN: %v; want an error that names CAP_NET_ADMIN", err)
		}
		return
	}
	if testing.Short() {
		t.Skip("runs itself in a user namespace of its own (unshare -r); skipped under -short")
	}
	cmd := exec.Command("unshare", "-r", os.Args[0], "-test.run=^TestOpenWithoutCapNetAdminSaysSo$", "-test.v")
	cmd.Env = append(os.Environ(), "TP_TUN_NO_CAP=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestOpenWithoutCapNetAdminSaysSo") {
		t.Fatalf("in a user namespace: %v\n%s", err, out)
	}
}
