package e2e

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testidp"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// With sso-renew: sign-in, a device enrolled by signing in renews only with
// a fresh sign-in: the real dlogin keeps the provider's refresh token
// (sealed with the device key) and later logins use it without asking the
// person. When the provider disables the person (the bad input: someone who
// left the organisation), the refresh token is refused, dlogin asks them to
// sign in again, and a declined sign-in gets no certificate.
func TestSSORenewWithSignIn(t *testing.T) {
	parallel(t)
	idp := testidp.Start(t,
		testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true, Groups: []string{"ops"}})
	srv := startServer(t, ssoPolicy, "TP_SSO_ISSUER="+idp.Issuer, "TP_SSO_CLIENT_ID="+testidp.ClientID,
		"TP_SSO_DOMAIN=example.org", "TP_SSO_RENEW=sign-in")
	echo := testnet.Echo(t)
	_, port, _ := strings.Cut(echo, ":")
	env := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "tp-home")}

	// dlogin, answering the provider's code prompt as the person would:
	// approve (or, with deny, decline) the first code it prints.
	dlogin := func(deny bool, args ...string) (string, error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := commandContext(ctx, binary("dlogin"), args...)
		cmd.Env = append(os.Environ(), env...)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var out strings.Builder
		code := regexp.MustCompile(`^To sign in, open \S+ and enter the code (\S+)$`)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			out.WriteString(line + "\n")
			if m := code.FindStringSubmatch(line); m != nil {
				if deny {
					err = idp.Deny(ctx, m[1])
				} else {
					err = idp.Approve(ctx, m[1], "s-alice")
				}
				if err != nil {
					t.Fatalf("answering code %s at the provider: %v\n%s", m[1], err, out.String())
				}
			}
		}
		err = cmd.Wait()
		return out.String() + stderr.String(), err
	}

	out, err := dlogin(false, "--sso", "--no-browser", "--server", srv.URL, "--fingerprint", srv.Fingerprint, "--device", "laptop")
	if err != nil || !strings.Contains(out, "Enrolled this device as alice@laptop") || !strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin --sso: %v\n%s", err, out)
	}
	if strings.Count(out, "enter the code") != 1 {
		t.Errorf("enrolling and the first login asked the person %d times; want once:\n%s", strings.Count(out, "enter the code"), out)
	}
	if out, err := runErr(env, strings.NewReader("hello after sign-in\n"), binary("tp"), "127.0.0.1", port); err != nil || !strings.Contains(out, "hello after sign-in") {
		t.Fatalf("tp after dlogin --sso: %v\n%s", err, out)
	}

	// A later login signs in again with the refresh token: nobody is asked.
	out, err = dlogin(false, "--no-browser")
	if err != nil || !strings.Contains(out, "Login successful!") || strings.Contains(out, "enter the code") {
		t.Fatalf("dlogin with a live refresh token: %v; want a login without a code\n%s", err, out)
	}

	// The person leaves the organisation: the provider refuses the refresh
	// token, dlogin asks for a sign-in, the person cannot give one.
	idp.Disable("s-alice")
	out, err = dlogin(true, "--no-browser")
	if err == nil || !strings.Contains(out, "renews this device only with a sign-in") || !strings.Contains(out, "declined at the identity provider") {
		t.Fatalf("dlogin for a person the provider disabled: %v; want a sign-in asked for and declined\n%s", err, out)
	}
	if strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin logged in a person the provider disabled:\n%s", out)
	}
}
