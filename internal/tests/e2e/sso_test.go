package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testidp"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// ssoPolicy lets group ops reach loopback; the reason names the groups.
const ssoPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "dial"
	"ops" in input.identity.groups
	input.destination.host == "127.0.0.1"
}

reason := sprintf("loopback is for group ops (you: %s, groups: %v)", [input.identity.device_id, input.identity.groups]) if not allow
`

// A person signs in with the organisation's identity provider: the real
// dlogin --sso --no-browser prints the page to open and the code, the person
// approves it at the provider, and the device is enrolled as the email's user
// with the provider's groups, gets its certificate, and tp reaches what the
// policy gives the group. Another person signs in in a browser instead (the
// authorization code flow with PKCE, back to dlogin's loopback); whose
// provider groups lack the group is refused with the policy's reason.
func TestSSOLoginThenDial(t *testing.T) {
	parallel(t)
	idp := testidp.Start(t,
		testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true, Groups: []string{"ops"}},
		testidp.Person{Subject: "s-dave", Email: "dave@example.org", EmailVerified: true, Groups: []string{"sales"}})
	srv := startServer(t, ssoPolicy, "TP_SSO_ISSUER="+idp.Issuer, "TP_SSO_CLIENT_ID="+testidp.ClientID, "TP_SSO_DOMAIN=example.org")
	echo := testnet.Echo(t)
	_, port, _ := strings.Cut(echo, ":")

	signIn := func(subject, device string, browser bool) []string {
		t.Helper()
		env, out, err := ssoSignIn(t, idp, srv, subject, device, browser)
		if err != nil {
			t.Fatal(err)
		}
		return append(env, out)
	}

	env := signIn("s-alice", "laptop", false)
	if out := env[1]; !strings.Contains(out, "Enrolled this device as alice@laptop (groups: ops)") {
		t.Fatalf("dlogin --sso did not name the device and its groups:\n%s", out)
	}
	env = env[:1]
	if out, err := runErr(env, strings.NewReader("hello through sso\n"), binary("tp"), "127.0.0.1", port); err != nil || !strings.Contains(out, "hello through sso") {
		t.Fatalf("tp 127.0.0.1 %s after dlogin --sso: %v\n%s", port, err, out)
	}
	// Later logins need no sign-in: the device key renews the certificate.
	if out := run(t, env, binary("dlogin")); !strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin without arguments after --sso:\n%s", out)
	}
	// A second sign-in in the same TP_HOME would overwrite the enrolled
	// device's key: dlogin refuses before it asks anyone.
	if out, err := runErr(env, nil, binary("dlogin"), "--sso", "--server", srv.URL, "--fingerprint", srv.Fingerprint); err == nil || !strings.Contains(out, "already holds the enrolled device alice@laptop") {
		t.Fatalf("dlogin --sso in an enrolled TP_HOME: %v\n%s", err, out)
	}

	// Dave signs in in his browser (the authorization code flow with PKCE and
	// a loopback redirect) and gets his own device, with his groups.
	denv := signIn("s-dave", "desk", true)
	if out := denv[1]; !strings.Contains(out, "Enrolled this device as dave@desk (groups: sales)") || strings.Contains(out, "enter the code") {
		t.Fatalf("dlogin --sso in a browser did not enrol dave@desk, or fell back to a code:\n%s", out)
	}
	denv = denv[:1]
	out, err := runErr(denv, strings.NewReader(""), binary("tp"), "127.0.0.1", port)
	if want := `loopback is for group ops (you: dave@desk, groups: ["sales"])`; err == nil || !strings.Contains(out, want) {
		t.Fatalf("tp for dave (group sales): %v\n%s\nwant the policy's reason %q", err, out, want)
	}
}

// chromiumOpener writes a $BROWSER for dlogin: a script that loads the page
// it is given in headless Chromium (Debian's) and exits once the last page
// of the redirects has loaded. Its output goes to chromium.log beside it.
//
// dlogin does not wait for its browser, and Chromium goes on writing its
// profile while it shuts down, after dlogin has signed in: the test's end
// then removed the profile under it ("directory not empty"). The script
// marks its start and Chromium's exit, and the test waits for the exit
// before its temporary directory goes.
func chromiumOpener(t *testing.T) string {
	t.Helper()
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is not installed: apt-get install chromium (deploy/test.sh does, run as root)")
	}
	dir := t.TempDir()
	script := filepath.Join(dir, "browser")
	started, exited := filepath.Join(dir, "started"), filepath.Join(dir, "exited")
	body := "#!/bin/sh\n: >" + started + "\nHOME=" + dir + " " + chromium + " --headless --no-sandbox --disable-gpu --no-first-run" +
		" --disable-background-networking --disable-component-update --disable-sync --disable-dev-shm-usage" +
		" --user-data-dir=" + filepath.Join(dir, "profile") + " --dump-dom \"$1\" >" + filepath.Join(dir, "chromium.log") + " 2>&1\n" +
		"status=$?\n: >" + exited + "\nexit $status\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	// Cleanups run last first: this one before t.TempDir's removal.
	t.Cleanup(func() {
		if _, err := os.Stat(started); err != nil {
			return // dlogin never opened it
		}
		waitFor(t, time.Minute, "headless Chromium, opened by dlogin, exits (its log: "+filepath.Join(dir, "chromium.log")+")", func() bool {
			_, err := os.Stat(exited)
			return err == nil
		})
	})
	return script
}

// ssoSignIn runs dlogin --sso (with args added) as subject, in a fresh
// TP_HOME: with a code (--no-browser) that it approves at the provider, or
// in a browser signed in there (headless Chromium, following the provider's
// redirects back to dlogin's loopback). It returns the home's environment,
// dlogin's output, and an error that quotes it when dlogin failed or
// printed no code, page or success.
func ssoSignIn(t *testing.T, idp *testidp.IdP, srv *server, subject, device string, browser bool, args ...string) ([]string, string, error) {
	t.Helper()
	env := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "tp-home")}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args = append([]string{"--sso", "--server", srv.URL, "--fingerprint", srv.Fingerprint, "--device", device}, args...)
	cmdEnv := append(os.Environ(), env...)
	if browser {
		idp.SignedIn(subject)
		cmdEnv = append(cmdEnv, "BROWSER="+chromiumOpener(t))
	} else {
		args = append(args, "--no-browser")
	}
	cmd := commandContext(ctx, binary("dlogin"), args...)
	cmd.Env = cmdEnv
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	var out strings.Builder
	code := regexp.MustCompile(`^To sign in, open (\S+) and enter the code (\S+)$`)
	opened := regexp.MustCompile(`^\(if it does not open, open this page on this machine: (\S+)\)$`)
	shown := false
	var approveErr error
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		out.WriteString(line + "\n")
		if m := code.FindStringSubmatch(line); m != nil && !shown && !browser {
			if !strings.HasPrefix(m[1], idp.Issuer) {
				t.Errorf("dlogin sends the person to %s; want the provider %s", m[1], idp.Issuer)
			}
			if approveErr = idp.Approve(ctx, m[2], subject); approveErr != nil {
				cancel()
			}
			shown = true
		}
		if m := opened.FindStringSubmatch(line); m != nil && browser {
			if !strings.HasPrefix(m[1], idp.Issuer) {
				t.Errorf("dlogin opens %s in the browser; want the provider %s", m[1], idp.Issuer)
			}
			shown = true
		}
	}
	werr := cmd.Wait()
	all := out.String() + stderr.String()
	switch {
	case approveErr != nil:
		return env, all, fmt.Errorf("approving the code at the provider: %v\n%s", approveErr, all)
	case werr != nil:
		return env, all, fmt.Errorf("dlogin --sso: %v\n%s", werr, all)
	case !shown || !strings.Contains(out.String(), "Login successful!"):
		return env, all, fmt.Errorf("dlogin --sso printed no code to approve or page to open, or no success:\n%s", all)
	}
	return env, out.String(), nil
}
