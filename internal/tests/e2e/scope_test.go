package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// scopePolicy lets alice listen as any name and dial loopback, and bob reach
// ci.rev.tp.internal: what a scoped device of alice's may do is narrower.
const scopePolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user == "alice"
}

allow if {
	input.action == "dial"
	input.identity.user == "alice"
	input.destination.ips == ["127.0.0.1"]
}

allow if {
	input.action == "dial"
	input.destination.reverse == "ci"
	input.identity.user == "bob"
}

reason := sprintf("%s may not reach %s", [input.identity.device_id, input.destination.host]) if not allow
`

// A credential for an application (a CI job's agent) is a device enrolled with
// a scope: `tpd enroll alice --device ci --scope expose:ci` gives a token whose
// device keeps ci exposed and does nothing else, though alice's policy lets her
// dial loopback and listen as any name. Bad input: a scope TP does not know;
// the scoped device dialing loopback and exposing another name.
func TestScopedDeviceExposesOnlyItsName(t *testing.T) {
	parallel(t)
	srv := startServer(t, scopePolicy)
	echo := testnet.Echo(t)
	_, echoPort, _ := strings.Cut(echo, ":")

	out, err := runErr(nil, nil, binary("tpd"), "enroll", "alice", "--device", "x", "--scope", "admin:all", "--data-dir", srv.DataDir)
	if err == nil || !strings.Contains(out, `scope "admin:all": want expose:LABEL, expose-public:LABEL, dial:LABEL or dial:*`) {
		t.Fatalf("tpd enroll --scope admin:all: %v\n%s", err, out)
	}

	out = run(t, nil, binary("tpd"), "enroll", "alice", "--device", "ci", "--scope", "expose:ci", "--data-dir", srv.DataDir)
	if !strings.Contains(out, "The device's scope is expose:ci: it may keep ci exposed") {
		t.Fatalf("tpd enroll --scope expose:ci did not say the scope:\n%s", out)
	}
	var dlogin []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "dlogin ") {
			dlogin = strings.Fields(line)[1:]
		}
	}
	ci := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "ci-home")}
	if out := run(t, ci, binary("dlogin"), dlogin...); !strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin of the scoped device:\n%s", out)
	}
	bob := srv.login(t, "bob", "phone")
	alice := srv.login(t, "alice", "laptop")

	// Inside the scope: ci stays exposed, and bob reaches it.
	startExpose(t, ci, "ci", echo, "--allow-user", "bob")
	if got, err := runErr(bob, strings.NewReader("through ci\n"), binary("tp"), "ci.rev.tp.internal", echoPort); err != nil || !strings.Contains(got, "through ci") {
		t.Fatalf("bob through ci.rev.tp.internal: %v, %q", err, got)
	}

	// Outside it: refused before the policy, which would allow alice both.
	got, err := runErr(ci, strings.NewReader(""), binary("tp"), "127.0.0.1", echoPort)
	want := "alice@ci holds a credential that may only keep ci exposed (scope expose:ci), not dial 127.0.0.1:" + echoPort
	if err == nil || !strings.Contains(got, want) {
		t.Fatalf("the scoped device's dial: %v\n%s\nwant it refused saying %q", err, got, want)
	}
	// A name, not an address: refused the same way, before it is looked up.
	got, err = runErr(ci, strings.NewReader(""), binary("tp"), "localhost", echoPort)
	if err == nil || !strings.Contains(got, "may only keep ci exposed (scope expose:ci), not dial localhost:"+echoPort) {
		t.Fatalf("the scoped device's dial of a name: %v\n%s", err, got)
	}
	got, err = runErr(ci, nil, binary("tp"), "expose", "other", echo, "--allow-user", "bob", "--exit-on-refusal")
	if err == nil || !strings.Contains(got, "may only keep ci exposed (scope expose:ci), not listen as other.rev.tp.internal") {
		t.Fatalf("the scoped device exposing another name: %v\n%s", err, got)
	}
	// The same policy lets alice's own device do both.
	if got, err := runErr(alice, strings.NewReader("alice\n"), binary("tp"), "127.0.0.1", echoPort); err != nil || !strings.Contains(got, "alice") {
		t.Fatalf("alice's unscoped dial: %v, %q", err, got)
	}

	users := run(t, nil, binary("tpd"), "users", "--data-dir", srv.DataDir)
	if !strings.Contains(users, "scope expose:ci") {
		t.Fatalf("tpd users does not show the device's scope:\n%s", users)
	}
}
