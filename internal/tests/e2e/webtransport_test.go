package e2e

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// evalAsync runs a JavaScript expression whose value is a promise in the
// page and returns what it resolves to, as JSON; a rejection fails the test.
func (b *chrome) evalAsync(expr string) string {
	b.t.Helper()
	res := b.call("Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true, "awaitPromise": true})
	var r struct {
		Result struct {
			Value any `json:"value"`
		} `json:"result"`
		Exception *struct {
			Text      string `json:"text"`
			Exception struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	_ = json.Unmarshal(res, &r)
	if r.Exception != nil {
		b.t.Fatalf("the page's script failed: %s %s", r.Exception.Text, r.Exception.Exception.Description)
	}
	out, _ := json.Marshal(r.Result.Value)
	return string(out)
}

// credentialJS is a JavaScript expression that builds TP.js's credential
// from the device certificate and key in home (a dlogin's TP_HOME), as
// module TP's Credential.
func credentialJS(t testing.TB, home string) string {
	t.Helper()
	cert, err := clients.Home{Dir: home}.Certificate()
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	var chain []string
	for _, der := range cert.Certificate {
		chain = append(chain, `TP.unb64("`+base64.StdEncoding.EncodeToString(der)+`")`)
	}
	return `{chain: [` + strings.Join(chain, ", ") + `], key: await TP.importKey(TP.unb64("` + base64.StdEncoding.EncodeToString(pkcs8) + `"))}`
}

// A page in headless Chromium dials through TP with TP.js over
// WebTransport, and over WebSockets as a browser without WebTransport does:
// a TCP echo and a UDP echo round-trip; a destination the policy refuses
// rejects with the policy's code and reason; a session with another
// device's certificate and no key of it is refused with a sentence the page
// can show.
func TestBrowserDialsOverWebTransport(t *testing.T) {
	for _, transport := range []string{"webtransport", "websocket"} {
		t.Run(transport, func(t *testing.T) { testBrowserDials(t, transport) })
	}
}

func testBrowserDials(t *testing.T, transport string) {
	parallel(t)
	srv := startServer(t, strings.Replace(testPolicy, `input.action == "dial"`, `input.action in {"dial", "dial_udp"}`, 1), "TP_WEBTRANSPORT=true")
	udpEcho := testnet.EchoUDP(t)
	alice := srv.login(t, "alice", "laptop")
	home := strings.TrimPrefix(alice[0], "TP_HOME=")
	if _, err := os.Stat(filepath.Join(home, "cert.pem")); err != nil {
		t.Fatal(err)
	}
	echo := testnet.Echo(t)
	b := startChromeQUIC(t, filepath.Join(srv.DataDir, "ca", "root.crt"), srv.Addr)
	b.open(srv.URL + "/tp/web/tp.js")
	b.waitText("TP.js")

	got := b.evalAsync(`(async () => {
		const TP = await import("/tp/web/tp.js");
		const s = await TP.connect(location.origin, ` + credentialJS(t, home) + `, {transport: "` + transport + `"});
		const c = await s.dial("` + echo + `");
		const w = c.writable.getWriter();
		await w.write(new TextEncoder().encode("ping from the browser"));
		await w.close();
		let got = "";
		const r = c.readable.getReader();
		for (;;) { const {value, done} = await r.read(); if (done) break; got += new TextDecoder().decode(value); }
		let refused = null;
		try { await s.dial("10.255.255.1:22"); } catch (e) { refused = {code: e.code, reason: e.reason}; }
		const f = await s.dialUDP("` + udpEcho + `");
		// A datagram may be lost (UDP's rule, on loopback too under load): send
		// again every half second until the echo's comes back.
		const pending = f.readable.getReader().read();
		let d = null;
		for (let i = 0; i < 60 && !d; i++) {
			await f.send(new TextEncoder().encode("a datagram from the browser"));
			d = await Promise.race([pending, new Promise((ok) => setTimeout(() => ok(null), 500))]);
		}
		const udp = d ? new TextDecoder().decode(d.value) : "no answer in 30s";
		const flowID = f.hello.flow;
		s.close();
		return {echo: got, session: c.id, refused, udp, flowID: flowID === undefined ? -1 : flowID};
	})()`)
	var res struct {
		Echo    string
		Session string
		Refused struct{ Code, Reason string }
		UDP     string
		FlowID  int
	}
	if err := json.Unmarshal([]byte(got), &res); err != nil {
		t.Fatalf("%s: %v", got, err)
	}
	if res.Echo != "ping from the browser" || len(res.Session) != 32 {
		t.Fatalf("the echo through TP.js: %+v", res)
	}
	if res.Refused.Code != "policy_denied" || !strings.Contains(res.Refused.Reason, "is limited to alice and group ops") {
		t.Fatalf("a denied dial from the page: %+v; want policy_denied with the policy's reason", res.Refused)
	}
	if res.UDP != "a datagram from the browser" {
		t.Fatalf("the UDP echo through TP.js: %q", res.UDP)
	}
	// Over WebTransport the flow's datagrams are the session's (it has a flow
	// id); over WebSockets, capsules (none).
	if hasID := res.FlowID >= 0; hasID != (transport == "webtransport") {
		t.Fatalf("the UDP flow over %s has flow id %d", transport, res.FlowID)
	}
}

// A page gets its own credential with TP.js: a key that never leaves the
// browser, a grant link that alice approves with tp grant on her laptop
// (scope dial:*), then a certificate for that key. With it the page dials
// what the policy lets alice reach; alice revoking the grant ends the
// page's session at once, with a sentence the page can show.
func TestBrowserCredentialFromGrant(t *testing.T) {
	for _, transport := range []string{"webtransport", "websocket"} {
		t.Run(transport, func(t *testing.T) { testBrowserCredentialFromGrant(t, transport) })
	}
}

func testBrowserCredentialFromGrant(t *testing.T, transport string) {
	parallel(t)
	srv := startServer(t, testPolicy, "TP_WEBTRANSPORT=true")
	alice := srv.login(t, "alice", "laptop")
	echo := testnet.Echo(t)
	b := startChromeQUIC(t, filepath.Join(srv.DataDir, "ca", "root.crt"), srv.Addr)
	b.open(srv.URL + "/tp/web/tp.js")
	b.waitText("TP.js")
	b.eval(`window.tpRun = (async () => {
		const TP = await import("/tp/web/tp.js");
		const cred = await TP.credential(location.origin, {poll: 100, onLink: (link, code) => { window.tpLink = link; window.tpCode = code; }});
		const s = await TP.connect(location.origin, cred, {transport: "` + transport + `"});
		window.tpSession = s;
		const c = await s.dial("` + echo + `");
		const w = c.writable.getWriter();
		await w.write(new TextEncoder().encode("ping with a granted key"));
		const r = c.readable.getReader();
		const {value} = await r.read();
		window.tpClosed = s.closed.then((e) => ({code: e.code, reason: e.reason}));
		return {echo: new TextDecoder().decode(value), device: cred.deviceID, scope: cred.scope};
	})().then((v) => { window.tpResult = JSON.stringify(v); }, (e) => { window.tpResult = "error: " + e; }); "started"`)
	link := waitEval(t, b, "window.tpLink || ''")
	code := b.eval("window.tpCode")
	out := run(t, alice, binary("tp"), "grant", link, "--yes")
	if !strings.Contains(out, "may only connect to what the policy allows its person, from pages of "+srv.URL) || !strings.Contains(out, code) {
		t.Fatalf("tp grant of the browser's link (code %s):\n%s", code, out)
	}
	var res struct{ Echo, Device, Scope string }
	got := waitEval(t, b, "window.tpResult || ''")
	if err := json.Unmarshal([]byte(got), &res); err != nil {
		t.Fatalf("the page: %s", got)
	}
	if res.Echo != "ping with a granted key" || !strings.HasPrefix(res.Device, "alice@grant-") || res.Scope != "dial:*@"+srv.URL {
		t.Fatalf("the page with its granted credential: %+v", res)
	}
	run(t, alice, binary("tp"), "grant", "--revoke", res.Device)
	closed := b.evalAsync("window.tpClosed")
	// A WebTransport session's close carries the server's sentence; a
	// WebSocket's close reason (at most 123 bytes) the code's.
	says := res.Device
	if transport == "websocket" {
		says = "was revoked"
	}
	if !strings.Contains(closed, `"code":"revoked"`) || !strings.Contains(closed, says) {
		t.Fatalf("the page's session after the grant was revoked: %s; want revoked, saying %s", closed, says)
	}
}

// waitPage evaluates expr in the page until ok holds for its value (up to
// 60 s) and returns the value; what names what is awaited. A page whose
// script set "error: …" fails the test at once.
func waitPage(t testing.TB, b *chrome, expr, what string, ok func(string) bool) string {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		v := b.eval(expr)
		if strings.HasPrefix(v, "error: ") {
			t.Fatalf("the page's script failed: %s", v)
		}
		if ok(v) {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("the page does not show %s within 60s: %s is %q", what, expr, v)
		}
		time.Sleep(50 * time.Millisecond) // waiting for the page, bounded by the deadline above
	}
}

// waitEval evaluates expr in the page until it is not empty.
func waitEval(t testing.TB, b *chrome, expr string) string {
	t.Helper()
	return waitPage(t, b, expr, "a value", func(v string) bool { return v != "" })
}

// waitPageOf evaluates expr in the page until it holds want.
func waitPageOf(t testing.TB, b *chrome, expr, want string) string {
	t.Helper()
	return waitPage(t, b, expr, fmt.Sprintf("%q", want), func(v string) bool { return strings.Contains(v, want) })
}

const browserSSHPolicy = `package tp.authz

default allow := false

allow if {
	input.action in {"listen", "dial"}
	input.identity.user == "alice"
	input.destination.reverse == "laptop-ssh"
}

reason := sprintf("%s may not reach %s", [input.identity.device_id, input.destination.host]) if not allow
`

// SSH from a web page, end to end, over WebTransport and over WebSockets:
// alice's laptop exposes its sshd
// (protected: only devices its agent allows, TLS from the dialer to the
// agent); TP's terminal page in headless Chromium gets a credential alice
// approves with tp grant, adds its SSH key to the sshd, connects through
// TP.js to laptop-ssh (TLS with the agent and SSH both run in the page, in
// WebAssembly, signing with keys WebCrypto holds), runs a command in the
// terminal and reads its output; revoking the grant ends the page's session
// and the page says so.
func TestBrowserSSHEndToEnd(t *testing.T) {
	for _, transport := range []string{"webtransport", "websocket"} {
		t.Run(transport, func(t *testing.T) { testBrowserSSH(t, transport) })
	}
}

func testBrowserSSH(t *testing.T, transport string) {
	parallel(t)
	srv := startServer(t, browserSSHPolicy, "TP_WEBTRANSPORT=true")
	sd := startSSHD(t)
	alice := srv.login(t, "alice", "laptop")
	startExpose(t, alice, "laptop-ssh", "127.0.0.1:"+strconv.Itoa(sd.Port), "--allow-user", "alice")

	b := startChromeQUIC(t, filepath.Join(srv.DataDir, "ca", "root.crt"), srv.Addr)
	b.open(srv.URL + "/tp/web/ssh.html?dest=laptop-ssh.rev.tp.internal:22&transport=" + transport + "&user=" + sd.User)
	waitEval(t, b, "window.tpReady ? 'yes' : ''")
	key := waitEval(t, b, "window.tpSSHKey || ''")
	if !strings.HasPrefix(key, "ecdsa-sha2-nistp256 ") {
		t.Fatalf("the page's SSH key: %q", key)
	}
	f, err := os.OpenFile(filepath.Join(filepath.Dir(sd.ClientKey), "authorized_keys"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(key + "\n"); err != nil {
		t.Fatal(err)
	}
	f.Close()

	b.click("#connect")
	link := waitEval(t, b, "window.tpLink || ''")
	run(t, alice, binary("tp"), "grant", link, "--yes")
	status := waitPageStatus(t, b, "Connected to ")
	if !strings.Contains(status, "end to end") {
		t.Fatalf("the page's status: %q; want an end-to-end session", status)
	}
	b.eval(`window.tpTerm.input("echo hello-$((6*7)) from the page\r", true)`)
	screen := `(() => { const b = window.tpTerm.buffer.active; let s = ""; for (let i = 0; i < b.length; i++) s += b.getLine(i).translateToString(true) + "\n"; return s; })()`
	waitPageOf(t, b, screen, "hello-42 from the page")

	grants := run(t, alice, binary("tp"), "grant", "--list")
	device := regexp.MustCompile(`alice@grant-[a-z2-7]{16}`).FindString(grants)
	if device == "" {
		t.Fatalf("tp grant --list shows no grant:\n%s", grants)
	}
	run(t, alice, binary("tp"), "grant", "--revoke", device)
	status = waitPageStatus(t, b, "The session ended (revoked)")
	says := device // a WebSocket's close reason is the code's (PROTOCOL.md 14.4)
	if transport == "websocket" {
		says = "was revoked"
	}
	if !strings.Contains(status, says) {
		t.Fatalf("the page's status after the revocation: %q; want it to say %s", status, says)
	}
}

// waitPageStatus waits until the terminal page's status holds want.
func waitPageStatus(t testing.TB, b *chrome, want string) string {
	t.Helper()
	return waitPageOf(t, b, "window.tpStatus || ''", want)
}

// The example page beside the terminal (echo.html): it gets its credential
// (alice approves with tp grant), then sends a line to a TCP echo and a
// datagram to a UDP echo through TP, and shows both answers, and a denied
// destination's reason.
func TestBrowserEchoPage(t *testing.T) {
	parallel(t)
	srv := startServer(t, strings.Replace(testPolicy, `input.action == "dial"`, `input.action in {"dial", "dial_udp"}`, 1), "TP_WEBTRANSPORT=true")
	alice := srv.login(t, "alice", "laptop")
	tcp, udp := testnet.Echo(t), testnet.EchoUDP(t)
	b := startChromeQUIC(t, filepath.Join(srv.DataDir, "ca", "root.crt"), srv.Addr)
	b.open(srv.URL + "/tp/web/echo.html?tcp=" + tcp + "&udp=" + udp + "&text=hello-from-the-example")
	waitEval(t, b, "window.tpReady ? 'yes' : ''")
	b.click("#send")
	run(t, alice, binary("tp"), "grant", waitEval(t, b, "window.tpLink || ''"), "--yes")
	waitPageOf(t, b, "window.tpOut || ''", "UDP ")
	out := b.eval("window.tpOut")
	if !strings.Contains(out, "TCP "+tcp+": hello-from-the-example") || !strings.Contains(out, "UDP "+udp+": hello-from-the-example") {
		t.Fatalf("the example page's answers:\n%s", out)
	}
	b.eval(`document.getElementById("tcp").value = "10.255.255.1:7"; document.getElementById("udp").value = ""`)
	b.click("#send")
	out = waitPageOf(t, b, "window.tpOut || ''", "10.255.255.1:7: ")
	if !strings.Contains(out, "TCP 10.255.255.1:7: policy_denied: 10.255.255.1:7 is limited to alice and group ops") {
		t.Fatalf("a denied destination on the example page:\n%s", out)
	}
}
