package e2e

import (
	"bufio"
	"context"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/testkit/testidp"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// sharePolicy lets alice and carol keep any name exposed, alice reach
// loopback, and guests the name shared with them (the default policy's
// rule); dave may do none of it.
const sharePolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user in {"alice", "carol"}
}

allow if {
	input.action == "dial"
	input.identity.user == "alice"
	input.destination.ips == ["127.0.0.1"]
}

allow if {
	input.action in {"dial", "dial_udp"}
	input.destination.reverse == input.identity.guest
}

reason := sprintf("%s may not %s %s", [input.identity.device_id, input.action, input.destination.host]) if not allow
`

// Alice, who exposes laptop-ssh, shares it for half an hour with bob, who
// works elsewhere: bob signs in with the identity provider (dlogin --sso),
// gets a device of his own that may connect to laptop-ssh and nothing else,
// with a certificate that ends with the share, and reaches alice's service
// end to end through her agent. Revoking the share ends bob's open session
// at once, and his next dial. Bad input: dave, whom the policy does not let
// keep laptop-ssh exposed, sharing it; alice sharing carol's name, which
// carol's agent holds; a share with alice's own domain, and with a domain
// the server's sso-guest-domains do not name; mallory, with whom nothing is
// shared, signing in; bob dialing loopback and asking to keep a name
// exposed; alice's user revoked (bob's access ends with it until lifted);
// bob logging in after the share ended.
func TestGuestShare(t *testing.T) {
	parallel(t)
	idp := testidp.Start(t,
		testidp.Person{Subject: "s-alice", Email: "alice@example.org", EmailVerified: true},
		testidp.Person{Subject: "s-bob", Email: "Bob@Partner.example", EmailVerified: true, Groups: []string{"admins"}},
		testidp.Person{Subject: "s-mallory", Email: "mallory@other.example", EmailVerified: true})
	auditLog := filepath.Join(t.TempDir(), "audit.log")
	srv := startServer(t, sharePolicy, "TP_SSO_ISSUER="+idp.Issuer, "TP_SSO_CLIENT_ID="+testidp.ClientID,
		"TP_SSO_DOMAIN=example.org", "TP_SSO_GUEST_DOMAINS=partner.example", "TP_AUDIT_LOG="+auditLog)
	echo := testnet.Echo(t)
	_, echoPort, _ := strings.Cut(echo, ":")
	alice := srv.login(t, "alice", "laptop")
	carol := srv.login(t, "carol", "pc")
	dave := srv.login(t, "dave", "pc")
	carolAgent := startGrantApp(t, carol, "expose", "carol-db", echo, "--allow-user", "carol")
	carolAgent("carol's registration", func(l string) bool { return strings.HasPrefix(l, "Exposing ") })

	agent := startGrantApp(t, alice, "expose", "laptop-ssh", echo, "--allow-user", "carol")
	agent("the registration", func(l string) bool {
		return strings.HasPrefix(l, "Exposing ") && strings.Contains(l, "laptop-ssh.rev.tp.internal")
	})

	if out, err := runErr(dave, nil, binary("tp"), "share", "laptop-ssh", "--with", "bob@partner.example"); err == nil ||
		!strings.Contains(out, "the policy does not let dave@pc keep laptop-ssh exposed, so it cannot share it with a guest") {
		t.Fatalf("dave sharing laptop-ssh: %v\n%s", err, out)
	}
	if out, err := runErr(alice, nil, binary("tp"), "share", "carol-db", "--with", "bob@partner.example"); err == nil ||
		!strings.Contains(out, "carol-db.rev.tp.internal is exposed by another user's device (carol@pc); only its own people can share it") {
		t.Fatalf("alice sharing carol's name: %v\n%s", err, out)
	}
	if out, err := runErr(alice, nil, binary("tp"), "share", "laptop-ssh", "--with", "mallory@other.example"); err == nil ||
		!strings.Contains(out, "guests of other.example may not be let in: the server's sso-guest-domains do not name it") {
		t.Fatalf("a share with a domain sso-guest-domains does not name: %v\n%s", err, out)
	}
	if out, err := runErr(alice, nil, binary("tp"), "share", "laptop-ssh", "--with", "@example.org"); err == nil ||
		!strings.Contains(out, "is of this server's own domain example.org") {
		t.Fatalf("a share with alice's own domain: %v\n%s", err, out)
	}
	out := run(t, alice, binary("tp"), "share", "laptop-ssh", "--with", "bob@partner.example", "--for", "30m")
	m := regexp.MustCompile(`Shared laptop-ssh with bob@partner.example until .* \((share-[0-9a-f]{12})\)`).FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, "dlogin --sso --server "+srv.URL+" --fingerprint "+srv.Fingerprint) ||
		!strings.Contains(out, "ssh -o ProxyCommand='tp %h %p' laptop-ssh.rev.tp.internal") {
		t.Fatalf("tp share said:\n%s", out)
	}
	shareID := m[1]

	// Mallory, with whom nothing is shared, is refused, saying so.
	if _, out, err := ssoSignIn(t, idp, srv, "s-mallory", "pc", false); err == nil ||
		!strings.Contains(out, `people of "other.example" may not enrol devices on this TP server (its sso-domain is example.org), and nobody has shared a name with mallory@other.example`) {
		t.Fatalf("mallory's sign-in: %v", err)
	}
	bob, out, err := ssoSignIn(t, idp, srv, "s-bob", "laptop", false)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "Enrolled this device as bob_partner.example@laptop, a guest: alice shared laptop-ssh.rev.tp.internal with you until") {
		t.Fatalf("bob's sign-in:\n%s", out)
	}
	// His certificate ends with the share, not in the server's 4 hours.
	who := run(t, bob, binary("tp"), "whoami")
	if !strings.Contains(who, "guest: may only connect to laptop-ssh, while the share that gave it lasts") {
		t.Fatalf("tp whoami of bob's device:\n%s", who)
	}
	in := regexp.MustCompile(`Expires: .*\(in ((\d+h)?(\d+m)?\d+s)\)`).FindStringSubmatch(who)
	if in == nil {
		t.Fatalf("tp whoami shows no expiry:\n%s", who)
	}
	if d, err := time.ParseDuration(in[1]); err != nil || d > 31*time.Minute {
		t.Fatalf("bob's certificate lasts %s (%v); want it to end with the 30-minute share", in[1], err)
	}

	// Bob reaches alice's service through her agent, end to end; nothing else.
	if got, err := runErr(bob, strings.NewReader("hello from a guest\n"), binary("tp"), "laptop-ssh.rev.tp.internal", echoPort); err != nil || !strings.Contains(got, "hello from a guest") {
		t.Fatalf("bob through laptop-ssh: %v, %q", err, got)
	}
	if got, err := runErr(bob, strings.NewReader(""), binary("tp"), "127.0.0.1", echoPort); err == nil ||
		!strings.Contains(got, "bob_partner.example@laptop is a guest that may only connect to laptop-ssh (scope guest:laptop-ssh), not dial 127.0.0.1:"+echoPort) {
		t.Fatalf("bob dialing loopback: %v\n%s", err, got)
	}
	if got, err := runErr(bob, nil, binary("tp"), "expose", "other", echo, "--allow-user", "bob", "--exit-on-refusal"); err == nil || !strings.Contains(got, "is a guest that may only connect to laptop-ssh") {
		t.Fatalf("bob exposing a name: %v\n%s", err, got)
	}
	if list := run(t, alice, binary("tp"), "share", "--list"); !regexp.MustCompile(shareID + `\s+laptop-ssh\s+bob@partner.example\s+.*\s+active\s+bob_partner.example@laptop`).MatchString(list) {
		t.Fatalf("tp share --list:\n%s", list)
	}

	// The operator sees the share and bob's device.
	activeRow := regexp.MustCompile(shareID + `\s+laptop-ssh\s+bob@partner.example\s+alice@laptop\s+.*\s+active\s+bob_partner.example@laptop`)
	if tokens := run(t, nil, binary("tpd"), "tokens", "--data-dir", srv.DataDir); !strings.Contains(tokens, "GUEST SHARES (1)") || !activeRow.MatchString(tokens) {
		t.Fatalf("tpd tokens:\n%s", tokens)
	}
	if status := run(t, nil, binary("tpd"), "status", "--data-dir", srv.DataDir); !activeRow.MatchString(status) {
		t.Fatalf("tpd status does not show the share:\n%s", status)
	}

	// Alice's user revoked, bob's access ends with her; lifted, it is back.
	run(t, nil, binary("tpd"), "revoke", "--user", "alice", "--data-dir", srv.DataDir)
	if got, err := runErr(bob, strings.NewReader("x\n"), binary("tp"), "laptop-ssh.rev.tp.internal", echoPort); err == nil ||
		!strings.Contains(got, "this device (bob_partner.example@laptop) or its user is revoked on the TP server") {
		t.Fatalf("bob after alice's user was revoked: %v\n%s", err, got)
	}
	if got, err := runErr(bob, nil, binary("dlogin")); err == nil || !strings.Contains(got, "whose sharer (user alice) has been revoked") {
		t.Fatalf("bob's login after alice's user was revoked: %v\n%s", err, got)
	}
	run(t, nil, binary("tpd"), "revoke", "--remove", "--user", "alice", "--data-dir", srv.DataDir)
	agent = startGrantApp(t, alice, "expose", "laptop-ssh", echo, "--allow-user", "carol")
	agent("the registration again", func(l string) bool {
		return strings.HasPrefix(l, "Exposing ") && strings.Contains(l, "laptop-ssh.rev.tp.internal")
	})

	// A session of bob's is open when alice revokes the share: it ends.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sess := commandContext(ctx, binary("tp"), "laptop-ssh.rev.tp.internal", echoPort)
	sess.Env = append(os.Environ(), bob...)
	stdin, _ := sess.StdinPipe()
	stdout, _ := sess.StdoutPipe()
	var stderr strings.Builder
	sess.Stderr = &stderr
	if err := sess.Start(); err != nil {
		t.Fatal(err)
	}
	io.WriteString(stdin, "still here\n")
	rd := bufio.NewReader(stdout)
	if line, err := rd.ReadString('\n'); err != nil || line != "still here\n" {
		t.Fatalf("bob's open session: %q, %v\n%s", line, err, stderr.String())
	}
	if out := run(t, alice, binary("tp"), "share", "--revoke", shareID); !strings.Contains(out, "Revoked "+shareID+": bob@partner.example may no longer connect to laptop-ssh") {
		t.Fatalf("tp share --revoke said:\n%s", out)
	}
	rest, _ := io.ReadAll(rd)
	err = sess.Wait()
	if err == nil || !strings.Contains(stderr.String(), "revoked") {
		t.Fatalf("bob's session after the revocation: exit %v, more output %q\n%s", err, rest, stderr.String())
	}
	stdin.Close()
	if got, err := runErr(bob, strings.NewReader("x\n"), binary("tp"), "laptop-ssh.rev.tp.internal", echoPort); err == nil {
		t.Fatalf("bob reached laptop-ssh after the share was revoked: %q", got)
	}
	if got, err := runErr(bob, nil, binary("dlogin")); err == nil || !strings.Contains(got, "the share of laptop-ssh with bob@partner.example ("+shareID+") was revoked") {
		t.Fatalf("bob's login after the share was revoked: %v\n%s", err, got)
	}
	if list := run(t, alice, binary("tp"), "share", "--list"); !regexp.MustCompile(shareID + `\s+laptop-ssh\s+.*\s+revoked`).MatchString(list) {
		t.Fatalf("tp share --list after the revocation:\n%s", list)
	}
	if users := run(t, nil, binary("tpd"), "users", "--data-dir", srv.DataDir); !regexp.MustCompile(`bob_partner.example\s+-\s+laptop\s+its share ended, scope guest:laptop-ssh, granted by share:` + shareID).MatchString(users) {
		t.Fatalf("tpd users after the revocation:\n%s", users)
	}
	audit, _ := os.ReadFile(auditLog)
	for _, want := range []string{`"act":"share","subject":"` + shareID + `","via":"its person's device alice@laptop"`,
		`"act":"share_revoke","subject":"` + shareID + `"`, `"guest":"bob@partner.example"`} {
		if !strings.Contains(string(audit), want) {
			t.Fatalf("the audit trail lacks %s:\n%s", want, audit)
		}
	}

	// Alice shares on TP's website instead, signed in there: anyone at
	// partner.example, for an hour. Bob enrols a second device by it and
	// reaches laptop-ssh; alice ends the share on the same page.
	idp.AllowRedirect(srv.URL + login.PathGrantSignedIn)
	idp.SignedIn("s-alice")
	b := startChrome(t, filepath.Join(srv.DataDir, "ca", "root.crt"))
	b.open(srv.URL + login.PathGrantsPage)
	b.waitText("Grants of alice")
	b.eval(`document.querySelector("#share input[name=name]").value = "laptop-ssh"`)
	b.eval(`document.querySelector("#share input[name=guest]").value = "@Partner.example"`)
	b.eval(`document.querySelector("#share input[name=hours]").value = "1"`)
	b.click("#share-button")
	page := b.waitText("may connect to laptop-ssh.rev.tp.internal until")
	web := regexp.MustCompile(`@partner.example may connect to .* \((share-[0-9a-f]{12})\)`).FindStringSubmatch(page)
	if web == nil {
		t.Fatalf("the website's answer to the share:\n%s", page)
	}
	phone, out, err := ssoSignIn(t, idp, srv, "s-bob", "phone", false)
	if err != nil || !strings.Contains(out, "Enrolled this device as bob_partner.example@phone, a guest") {
		t.Fatalf("bob's second sign-in, by the domain share: %v\n%s", err, out)
	}
	if got, err := runErr(phone, strings.NewReader("by the domain share\n"), binary("tp"), "laptop-ssh.rev.tp.internal", echoPort); err != nil || !strings.Contains(got, "by the domain share") {
		t.Fatalf("bob's phone through laptop-ssh: %v, %q", err, got)
	}
	b.open(srv.URL + login.PathGrantsPage)
	page = b.waitText("Guest shares")
	if !regexp.MustCompile(web[1] + `\s+laptop-ssh\s+@partner.example\s+.*\s+active\s+bob_partner.example@phone`).MatchString(page) {
		t.Fatalf("alice's page does not list the share with bob's phone:\n%s", page)
	}
	b.click(`button[value="` + web[1] + `"]`)
	b.waitText("ended: the guests' sessions ended")
	if got, err := runErr(phone, strings.NewReader("x\n"), binary("tp"), "laptop-ssh.rev.tp.internal", echoPort); err == nil {
		t.Fatalf("bob's phone reached laptop-ssh after alice ended the share on the website: %q", got)
	}
	audit, _ = os.ReadFile(auditLog)
	if !strings.Contains(string(audit), `"act":"share","subject":"`+web[1]+`","via":"its person's sign-in on the website (subject s-alice)"`) {
		t.Fatalf("the audit trail lacks the website's share:\n%s", audit)
	}
}
