package e2e

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/testkit/testidp"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// grantPolicy lets alice keep ci exposed and bob reach it; carol may do
// neither.
const grantPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user == "alice"
	input.destination.reverse == "ci"
}

allow if {
	input.action == "dial"
	input.destination.reverse == "ci"
	input.identity.user == "bob"
}

allow if {
	input.action == "dial"
	input.identity.user == "alice"
	input.destination.ips == ["127.0.0.1"]
}

reason := sprintf("%s may not %s %s", [input.identity.device_id, input.action, input.destination.host]) if not allow
`

// An application asks for a credential the way an OAuth client does: `tp
// expose --request ci` makes its own key and prints a link; alice approves it
// from her enrolled laptop with `tp grant LINK`; the application then holds a
// device of alice's user that may only keep ci exposed, and bob reaches ci
// through it. Bad input: carol, whom the policy does not let keep ci
// exposed, approving; a link that is not a grant link; the granted
// application dialing loopback, which alice's own device may.
func TestGrantFlow(t *testing.T) {
	parallel(t)
	auditLog := filepath.Join(t.TempDir(), "audit.log")
	srv := startServer(t, grantPolicy, "TP_AUDIT_LOG="+auditLog)
	echo := testnet.Echo(t)
	_, echoPort, _ := strings.Cut(echo, ":")
	alice := srv.login(t, "alice", "laptop")
	bob := srv.login(t, "bob", "phone")
	carol := srv.login(t, "carol", "pc")
	app := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "app-home")}

	next := startGrantApp(t, app, "expose", "ci", echo, "--allow-user", "bob",
		"--request", "--server", srv.URL, "--fingerprint", srv.Fingerprint, "--app", "ci job")
	codeLine := next("the code", func(l string) bool { return strings.HasPrefix(l, "Code ") })
	code := regexp.MustCompile(`^Code ([A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4})\.`).FindStringSubmatch(codeLine)
	if code == nil {
		t.Fatalf("the code line %q shows no code", codeLine)
	}
	grantLine := next("the grant command", func(l string) bool { return strings.HasPrefix(l, `tp grant "`) })
	link := strings.TrimSuffix(strings.TrimPrefix(grantLine, `tp grant "`), `"`)

	// The link opens tpd's page, which names the request and the command.
	root, err := login.FetchRoot(context.Background(), srv.URL, srv.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	hc := login.HTTPClient(root)
	resp, err := hc.Get(link)
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(page), "keep <b>ci</b> exposed") || !strings.Contains(string(page), code[1]) ||
		!strings.Contains(string(page), "tp grant &#34;https://") {
		t.Fatalf("the grant link's page (%d):\n%s", resp.StatusCode, page)
	}

	if out, err := runErr(alice, strings.NewReader("y\n"), binary("tp"), "grant", link); err == nil || !strings.Contains(out, "asks before it approves: run it at a terminal, or add --yes") {
		t.Fatalf("an approval without a terminal and without --yes: %v\n%s", err, out)
	}
	if out, err := runErr(carol, nil, binary("tp"), "grant", "--yes", link); err == nil || !strings.Contains(out, "the policy does not let carol@pc keep ci exposed") {
		t.Fatalf("carol's approval: %v\n%s", err, out)
	}
	if out, err := runErr(alice, nil, binary("tp"), "grant", "--yes", srv.URL+"/elsewhere?name=ci"); err == nil || !strings.Contains(out, "is not a grant link") {
		t.Fatalf("a link that is not a grant link: %v\n%s", err, out)
	}
	out := run(t, alice, binary("tp"), "grant", "--yes", link)
	device := regexp.MustCompile(`the device (alice@grant-[a-z2-7]{16}), scope expose:ci`).FindStringSubmatch(out)
	if device == nil || !strings.Contains(out, "(code "+code[1]+")") || !strings.Contains(out, "ci job") {
		t.Fatalf("alice's approval said:\n%s\nwant the granted device, its scope and the application's code %s", out, code[1])
	}
	next("the registration", func(l string) bool {
		return strings.HasPrefix(l, "Exposing ") && strings.Contains(l, "ci.rev.tp.internal")
	})

	if got, err := runErr(bob, strings.NewReader("through the grant\n"), binary("tp"), "ci.rev.tp.internal", echoPort); err != nil || !strings.Contains(got, "through the grant") {
		t.Fatalf("bob through ci.rev.tp.internal: %v, %q", err, got)
	}
	got, err := runErr(app, strings.NewReader(""), binary("tp"), "127.0.0.1", echoPort)
	if err == nil || !strings.Contains(got, device[1]+" holds a credential that may only keep ci exposed (scope expose:ci), not dial 127.0.0.1:"+echoPort) {
		t.Fatalf("the granted application's dial: %v\n%s", err, got)
	}
	// tp whoami of the application says what it may do and who granted it.
	if who := run(t, app, binary("tp"), "whoami"); !strings.Contains(who, "Scope:       expose:ci: may only keep ci exposed to the devices its agent allows") ||
		!strings.Contains(who, "Granted by:  alice@laptop") {
		t.Fatalf("tp whoami of the granted application:\n%s", who)
	}
	// Alice lists her grants; tpd tokens and tpd status show the grant with
	// its agent, and tpd tokens the enrollment token not yet redeemed.
	if list := run(t, alice, binary("tp"), "grant", "--list"); !regexp.MustCompile(regexp.QuoteMeta(device[1]) + `\s+expose:ci\s+alice@laptop\s+.*\s+active`).MatchString(list) {
		t.Fatalf("tp grant --list:\n%s", list)
	}
	run(t, nil, binary("tpd"), "enroll", "dave", "--device", "pc", "--data-dir", srv.DataDir)
	if tokens := run(t, nil, binary("tpd"), "tokens", "--data-dir", srv.DataDir); !regexp.MustCompile(regexp.QuoteMeta(device[1])+`\s+expose:ci\s+alice@laptop\s+.*\s+active`).MatchString(tokens) ||
		!strings.Contains(tokens, "ENROLLMENT TOKENS NOT YET REDEEMED (1)") || !strings.Contains(tokens, "dave@pc") {
		t.Fatalf("tpd tokens:\n%s", tokens)
	}
	if status := run(t, nil, binary("tpd"), "status", "--data-dir", srv.DataDir); !regexp.MustCompile(regexp.QuoteMeta(device[1]) + `\s+expose:ci\s+alice@laptop\s+.*\s+agent connected`).MatchString(status) {
		t.Fatalf("tpd status does not show the grant with its agent:\n%s", status)
	}
	// Bad input: carol revoking alice's grant; the application listing
	// grants with its scoped credential.
	if out, err := runErr(carol, nil, binary("tp"), "grant", "--revoke", device[1]); err == nil || !strings.Contains(out, "carol holds no grant \""+device[1]+"\"") {
		t.Fatalf("carol revoking alice's grant: %v\n%s", err, out)
	}
	if out, err := runErr(app, nil, binary("tp"), "grant", "--list"); err == nil || !strings.Contains(out, "is itself a scoped credential (expose:ci)") {
		t.Fatalf("the application listing grants: %v\n%s", err, out)
	}

	// The same approval again changes nothing; tpd users shows the grant.
	if out := run(t, alice, binary("tp"), "grant", "--yes", link); !strings.Contains(out, device[1]) {
		t.Fatalf("the approval again:\n%s", out)
	}
	if users := run(t, nil, binary("tpd"), "users", "--data-dir", srv.DataDir); !strings.Contains(users, strings.TrimPrefix(device[1], "alice@")) || !strings.Contains(users, "scope expose:ci") {
		t.Fatalf("tpd users does not list the grant:\n%s", users)
	}
	// A grant lives as long as the device that approved it: revoking
	// alice@laptop ends the application's exposure at once and says why.
	run(t, nil, binary("tpd"), "revoke", "--device", "alice@laptop", "--data-dir", srv.DataDir)
	// The agent stops, saying why, instead of retrying as for a policy's
	// refusal: it once logged "the TP server's policy no longer allows these
	// names … retrying".
	if l := next("the end of the exposure with its approver", func(l string) bool {
		return strings.Contains(l, "granted by alice@laptop, which has been revoked")
	}); !strings.Contains(l, "the TP server ended this agent: this device or its user is revoked on the TP server: device ") || strings.Contains(l, "retrying") {
		t.Fatalf("the agent's line for its grant's end:\n%s", l)
	}
	if got, err := runErr(bob, strings.NewReader("x\n"), binary("tp"), "ci.rev.tp.internal", echoPort); err == nil {
		t.Fatalf("bob reached ci after its grant's approver was revoked: %q", got)
	}
	if users := run(t, nil, binary("tpd"), "users", "--data-dir", srv.DataDir); !regexp.MustCompile(strings.TrimPrefix(device[1], "alice@") + `\s+revoked with its approver, scope expose:ci, granted by alice@laptop`).MatchString(users) {
		t.Fatalf("tpd users does not show the grant revoked with its approver:\n%s", users)
	}

	// The approver back, the grant works again; revoking the grant itself
	// ends the application's exposure at once.
	run(t, nil, binary("tpd"), "revoke", "--remove", "--device", "alice@laptop", "--data-dir", srv.DataDir)
	next = startGrantApp(t, app, "expose", "ci", echo, "--allow-user", "bob")
	next("the registration again", func(l string) bool {
		return strings.HasPrefix(l, "Exposing ") && strings.Contains(l, "ci.rev.tp.internal")
	})
	out = run(t, alice, binary("tp"), "grant", "--revoke", device[1])
	if !strings.Contains(out, "Revoked "+device[1]+" (scope expose:ci, granted by alice@laptop)") {
		t.Fatalf("tp grant --revoke said:\n%s", out)
	}
	next("the end of the exposure", func(l string) bool { return strings.Contains(l, "revoked") })
	if got, err := runErr(bob, strings.NewReader("x\n"), binary("tp"), "ci.rev.tp.internal", echoPort); err == nil {
		t.Fatalf("bob reached ci after its grant was revoked: %q", got)
	}
	if list := run(t, alice, binary("tp"), "grant", "--list"); !regexp.MustCompile(regexp.QuoteMeta(device[1]) + `\s+expose:ci\s+alice@laptop\s+.*\s+revoked`).MatchString(list) {
		t.Fatalf("tp grant --list after the revocation:\n%s", list)
	}
	if audit, _ := os.ReadFile(auditLog); !strings.Contains(string(audit), `"act":"grant_revoke","subject":"`+device[1]+`","via":"its person's device alice@laptop"`) {
		t.Fatalf("the audit trail has no grant_revoke line:\n%s", audit)
	}
}

// startGrantApp runs tp with args as the application whose home env names, and
// returns next, which waits (up to 60 s) for the first line of its log that
// match accepts. The process is stopped at the test's end.
func startGrantApp(t *testing.T, env []string, args ...string) (next func(what string, match func(string) bool) string) {
	t.Helper()
	cmd := command(binary("tp"), args...)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	log := &testlog.Buffer{}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("the application's log (tp %s):\n%s", strings.Join(args, " "), log.String())
		}
	})
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			log.Write([]byte(sc.Text() + "\n"))
			lines <- sc.Text()
		}
		close(lines)
	}()
	return func(what string, match func(string) bool) string {
		t.Helper()
		timeout := time.After(60 * time.Second)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("the application exited before %s:\n%s", what, log.String())
				}
				if match(l) {
					return l
				}
			case <-timeout:
				t.Fatalf("no %s within 60s:\n%s", what, log.String())
			}
		}
	}
}

// A person approves an application's request on TP's website by signing in
// with the organisation's identity provider, in a real browser: the link's
// page offers the sign-in, the provider sends the browser back, the page
// shows who signed in and the application's code, and Approve grants. The
// person's grants page lists them and revokes one, whose agent stops; a
// grant lives as long as the user is bound to that account. Bad input: the
// approval posted without the browser's cookie, the provider's answer
// replayed after the approval, an answer with a state nobody started; then
// the user's binding cleared (tpd users unbind), which ends the other grant.
func TestGrantApprovedOnWebsite(t *testing.T) {
	parallel(t)
	idp := testidp.Start(t, testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true})
	policy := strings.ReplaceAll(grantPolicy, `input.destination.reverse == "ci"`, `input.destination.reverse in {"ci", "ci3"}`)
	srv := startServer(t, policy, "TP_SSO_ISSUER="+idp.Issuer, "TP_SSO_CLIENT_ID="+testidp.ClientID, "TP_SSO_DOMAIN=example.org")
	idp.AllowRedirect(srv.URL + login.PathGrantSignedIn) // TP's website, registered at the provider
	echo := testnet.Echo(t)
	_, echoPort, _ := strings.Cut(echo, ":")
	bob := srv.login(t, "bob", "phone")
	app := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "app-home")}
	next := startGrantApp(t, app, "expose", "ci", echo, "--allow-user", "bob",
		"--request", "--server", srv.URL, "--fingerprint", srv.Fingerprint, "--app", "ci job")
	code := strings.Fields(next("the code", func(l string) bool { return strings.HasPrefix(l, "Code ") }))[1]
	code = strings.TrimSuffix(code, ".")
	link := strings.TrimSuffix(strings.TrimPrefix(next("the link", func(l string) bool { return strings.HasPrefix(l, `tp grant "`) }), `tp grant "`), `"`)

	idp.SignedIn("s-alice") // alice's browser has a session at the provider
	b := startChrome(t, filepath.Join(srv.DataDir, "ca", "root.crt"))
	b.open(link)
	b.waitText("Sign in with your organisation's account")
	b.click("#sign-in")
	page := b.waitText("Signed in as alice (alice@example.org)")
	if !strings.Contains(page, "ci job asks for a credential") || !strings.Contains(page, code) {
		t.Fatalf("the approval page does not show the application and its code %s:\n%s", code, page)
	}
	signedIn := b.eval("location.href")
	state, form := b.eval(`document.querySelector("input[name=state]").value`), b.eval(`document.querySelector("input[name=form]").value`)

	// The same answer posted from elsewhere (no cookie of this browser) is refused.
	root, err := login.FetchRoot(context.Background(), srv.URL, srv.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	hc := login.HTTPClient(root)
	resp, err := hc.PostForm(srv.URL+login.PathGrantApprove, url.Values{"state": {state}, "form": {form}, "answer": {"approve"}})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "not one this browser was asked for") {
		t.Fatalf("the approval without the browser's cookie: %d\n%s", resp.StatusCode, body)
	}

	b.click("#approve")
	page = b.waitText("now holds")
	device := regexp.MustCompile(`now holds (alice@grant-[a-z2-7]{16}),`).FindStringSubmatch(page)
	if device == nil {
		t.Fatalf("the approval's page names no granted device:\n%s", page)
	}
	next("the registration", func(l string) bool {
		return strings.HasPrefix(l, "Exposing ") && strings.Contains(l, "ci.rev.tp.internal")
	})
	if got, err := runErr(bob, strings.NewReader("through a web grant\n"), binary("tp"), "ci.rev.tp.internal", echoPort); err != nil || !strings.Contains(got, "through a web grant") {
		t.Fatalf("bob through ci.rev.tp.internal: %v, %q", err, got)
	}
	if tokens := run(t, nil, binary("tpd"), "tokens", "--data-dir", srv.DataDir); !regexp.MustCompile(regexp.QuoteMeta(device[1]) + `\s+expose:ci\s+sign-in:s-alice\s+.*\s+active`).MatchString(tokens) {
		t.Fatalf("tpd tokens does not show the grant approved by signing in:\n%s", tokens)
	}

	// The provider's answer again, and one with a state nobody started.
	b.open(signedIn)
	b.waitText("This sign-in is not one this browser started")
	u, _ := url.Parse(signedIn)
	q := u.Query()
	q.Set("state", "forged")
	u.RawQuery = q.Encode()
	b.open(u.String())
	b.waitText("This sign-in is not one this browser started")

	// A second application, approved the same way, lets the person pick the
	// name: it suggests ci2, alice approves ci3, and it exposes ci3. Bad
	// input: a name that is no reverse name's label.
	app2 := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "app2-home")}
	next2 := startGrantApp(t, app2, "expose", "ci2", echo, "--allow-user", "bob",
		"--request", "--let-pick", "--server", srv.URL, "--fingerprint", srv.Fingerprint, "--app", "second job")
	link2 := strings.TrimSuffix(strings.TrimPrefix(next2("the link", func(l string) bool { return strings.HasPrefix(l, `tp grant "`) }), `tp grant "`), `"`)
	if out, err := runErr(bob, nil, binary("tp"), "grant", "--yes", "--name", "ci3", link); err == nil || !strings.Contains(out, "the application asks for ci and takes no other name") {
		t.Fatalf("another name for an application that lets nobody pick: %v\n%s", err, out)
	}
	b.open(link2)
	b.waitText("Sign in with your organisation's account")
	b.click("#sign-in")
	b.waitText("It suggests ci2 and takes the one you approve")
	b.eval(`document.querySelector("#name").value = "CI 3"`)
	b.click("#approve")
	b.waitText("is not a reverse name's label")
	b.open(link2)
	b.waitText("Sign in with your organisation's account")
	b.click("#sign-in")
	b.waitText("It suggests ci2 and takes the one you approve")
	b.eval(`document.querySelector("#name").value = "ci3"`)
	b.click("#approve")
	second := regexp.MustCompile(`now holds (alice@grant-[a-z2-7]{16}), which may only keep ci3 exposed`).FindStringSubmatch(b.waitText("now holds"))
	if second == nil {
		t.Fatal("the second approval names no granted device for ci3")
	}
	next2("the person's pick", func(l string) bool {
		return strings.Contains(l, "The person approved the name ci3 (this application suggested ci2)")
	})
	next2("the second registration", func(l string) bool {
		return strings.HasPrefix(l, "Exposing ") && strings.Contains(l, "ci3.rev.tp.internal")
	})

	// Alice lists her grants on the website and revokes the first: its agent stops.
	b.open(srv.URL + login.PathGrantsPage)
	page = b.waitText("Grants of alice")
	for _, d := range []string{device[1], second[1]} {
		if !regexp.MustCompile(regexp.QuoteMeta(d) + `\s+expose:ci3?\s+sign-in:s-alice\s+.*active`).MatchString(page) {
			t.Fatalf("alice's grants page does not list %s as active:\n%s", d, page)
		}
	}
	b.click(`button[value="` + device[1] + `"]`)
	b.waitText(device[1] + " is revoked for good")
	if l := next("the end of the first exposure", func(l string) bool { return strings.Contains(l, "revoked") }); !strings.Contains(l, "is revoked on the TP server") {
		t.Fatalf("the first application's line for its revocation:\n%s", l)
	}
	if got, err := runErr(bob, strings.NewReader("x\n"), binary("tp"), "ci.rev.tp.internal", echoPort); err == nil {
		t.Fatalf("bob reached ci after alice revoked its grant on the website: %q", got)
	}

	// The second grant lives as long as alice's binding to that account.
	next = next2
	run(t, nil, binary("tpd"), "users", "unbind", "alice", "--data-dir", srv.DataDir)
	next("the end of the exposure", func(l string) bool { return strings.Contains(l, "no longer bound") })
	if got, err := runErr(bob, strings.NewReader("x\n"), binary("tp"), "ci3.rev.tp.internal", echoPort); err == nil {
		t.Fatalf("bob reached ci3 after the approving account was unbound: %q", got)
	}
}
