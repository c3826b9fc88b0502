package testnet

import (
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// nsEnv marks a test binary run again inside a namespace of its own; its value
// is the name of the test it runs there.
const nsEnv = "TP_TEST_IN_NAMESPACE"

// InNetns runs the calling test again in a network namespace of its own, where
// nothing it sends leaves the namespace and tun devices, routes and addresses
// can be made, and reports whether the caller is that run. There, lo is up and
// carries addrs ("10.9.8.1/32", "100::1/64": prefixes on lo, so that the test
// can use addresses that are not loopback ones); an IPv6 one is added without
// duplicate address detection, which would leave it tentative ("bind: cannot
// assign requested address") until the kernel's work item runs, on a busy
// machine after the test's first dial.
//
// The caller's run passes or fails with the namespace's run, whose output it
// logs, and fails when that run ran no such test (its -test.run matched
// nothing, which go test passes silently). As root a network namespace is
// enough (unshare -n); otherwise a user namespace maps the caller to root in
// it (unshare -rn). Under -short the caller's run skips: it starts a process.
func InNetns(t *testing.T, addrs ...string) bool {
	t.Helper()
	flag := "-rn"
	if os.Geteuid() == 0 {
		flag = "-n"
	}
	if !inNamespace(t, "a network namespace", flag) {
		return false
	}
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s in the test's network namespace: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ip("link", "set", "lo", "up")
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			t.Fatalf("InNetns: %q is no address prefix: %v", a, err)
		}
		if p.Addr().Is6() {
			ip("addr", "add", a, "dev", "lo", "nodad")
		} else {
			ip("addr", "add", a, "dev", "lo")
		}
	}
	return true
}

// InUserns runs the calling test again in a user namespace of its own that
// keeps the host's network namespace (unshare -r): root there, without any
// capability over the host's network. It reports whether the caller is that
// run; the caller's run passes or fails with it, as for InNetns.
func InUserns(t *testing.T) bool {
	t.Helper()
	return inNamespace(t, "a user namespace", "-r")
}

// inNamespace reports whether this is the run of t inside its namespace, and
// otherwise runs t there with unshare's flag and returns false.
func inNamespace(t *testing.T, what, flag string) bool {
	t.Helper()
	if os.Getenv(nsEnv) == t.Name() {
		return true
	}
	if testing.Short() {
		t.Skipf("runs itself in %s of its own (unshare %s); skipped under -short", what, flag)
	}
	cmd := exec.Command("unshare", flag, os.Args[0], "-test.run=^"+regexp.QuoteMeta(t.Name())+"$",
		"-test.v", "-test.count=1", "-test.timeout=10m")
	cmd.Env = append(os.Environ(), nsEnv+"="+t.Name())
	out, err := cmd.CombinedOutput()
	t.Logf("in %s of its own (unshare %s):\n%s", what, flag, out)
	if err != nil {
		t.Fatalf("the test failed in %s of its own: %v", what, err)
	}
	if !strings.Contains(string(out), "--- PASS: "+t.Name()+" (") {
		t.Fatalf("the run in %s of its own did not pass %s (did its -test.run match nothing?)", what, t.Name())
	}
	return false
}
