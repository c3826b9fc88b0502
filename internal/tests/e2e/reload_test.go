package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// editConfig replaces old with new in the data dir's tpd.yaml.
func editConfig(t *testing.T, dataDir, old, new string) {
	t.Helper()
	path := filepath.Join(dataDir, "tpd.yaml")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("tpd.yaml has no %q:\n%s", old, b)
	}
	if err := os.WriteFile(path, []byte(strings.Replace(string(b), old, new, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestReload: `tpd reload` and SIGHUP re-read tpd.yaml in a running tpd while a
// tunnel runs. Bad inputs: a tpd.yaml with an invalid value, and one that
// changes the reverse zone, which only a restart can change. A new public
// port opens (an agent exposes a service on it); the broken files are refused
// with the key named and the running configuration keeps working; the tunnel
// survives all of it.
func TestReload(t *testing.T) {
	parallel(t)
	raceTPD(t)
	dataDir := initTPD(t, drainPolicy)
	p := startTPD(t, dataDir, "127.0.0.1:0", nil)
	alice := p.login(t, "alice", "laptop")
	reload := func() (string, error) {
		return runErr(nil, nil, binary("tpd"), "reload", "--data-dir", dataDir)
	}

	// A tunnel that runs through every reload.
	echo := testnet.Echo(t)
	d, err := clientFor(t, alice).Dialer()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	tunnel, err := d.DialContext(ctx, "tcp", echo)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	defer tunnel.Close()
	tunnel.SetDeadline(time.Now().Add(120 * time.Second))
	roundTrip := func(msg string) {
		t.Helper()
		if _, err := io.WriteString(tunnel, msg); err != nil {
			t.Fatalf("the tunnel broke: %v", err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(tunnel, buf); err != nil || string(buf) != msg {
			t.Fatalf("the tunnel broke: %q, %v", buf, err)
		}
	}
	roundTrip("before")

	// A public port: not open before the reload, open after it.
	port := testnet.FreePort(t, "tcp")
	editConfig(t, dataDir, `public-ports: ""`, `public-ports: "`+strconv.Itoa(port)+`"`)
	out, err := reload()
	if err != nil {
		t.Fatalf("tpd reload: %v\n%s", err, out)
	}
	if want := `public-ports: "" → ` + strconv.Itoa(port); !strings.Contains(out, want) {
		t.Errorf("tpd reload did not say %q:\n%s", want, out)
	}
	roundTrip("after the public-ports reload")
	svc := testnet.Serve(t, func(c *net.TCPConn) { io.WriteString(c, "hello from the exposed service\n") })
	agent := startAgentProc(t, alice, "web", svc, "--public", strconv.Itoa(port))
	agent.waitRegistered(t)
	readPublic := func() {
		t.Helper()
		c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 10*time.Second)
		if err != nil {
			t.Fatalf("the public port %d opened by the reload: %v", port, err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "hello from the exposed service\n" {
			t.Fatalf("the public port %d: %q, %v", port, got, err)
		}
	}
	readPublic()

	// A site added by the reload: TP's CA certifies www.test and its page is
	// served over HTTPS on the shared port; the tunnel runs on.
	siteDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(siteDir, "index.html"), []byte("<p>added by a reload</p>"), 0o644); err != nil {
		t.Fatal(err)
	}
	editConfig(t, dataDir, "sites: []\n", "sites:\n  - {name: \"www.test\", root: \""+siteDir+"\"}\n")
	if out, err := reload(); err != nil || !strings.Contains(out, "sites:") {
		t.Fatalf("tpd reload adding the site www.test: %v; want the change to name sites:\n%s", err, out)
	}
	getSite := func(name string) (string, error) {
		pem, err := os.ReadFile(filepath.Join(dataDir, "ca", "root.crt"))
		if err != nil {
			return "", err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		tr := &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "tcp", p.Addr)
			},
			TLSClientConfig:   &tls.Config{RootCAs: pool},
			DisableKeepAlives: true,
		}
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + name + "/")
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.Status + " " + string(b), err
	}
	for deadline := time.Now().Add(90 * time.Second); ; {
		page, err := getSite("www.test")
		if err == nil && strings.Contains(page, "added by a reload") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the site added by the reload does not serve within 90s: %q, %v\n%s", page, err, p.log.String())
		}
		time.Sleep(100 * time.Millisecond) // polling for the certificate, bounded by the deadline above
	}
	roundTrip("after the sites reload")

	// A broken site (its root does not exist): refused; www.test keeps serving.
	editConfig(t, dataDir, "  - {name: \"www.test\"", "  - {name: \"blog.test\", root: \"/nonexistent/blog\"}\n  - {name: \"www.test\"")
	if out, err := reload(); err == nil || !strings.Contains(out, "blog.test") {
		t.Fatalf("tpd reload of a site with a missing root: %v; want a refusal naming blog.test:\n%s", err, out)
	}
	editConfig(t, dataDir, "  - {name: \"blog.test\", root: \"/nonexistent/blog\"}\n", "")
	if page, err := getSite("www.test"); err != nil || !strings.Contains(page, "added by a reload") {
		t.Fatalf("www.test after the refused reload: %q, %v", page, err)
	}

	// A broken value: refused, naming it; the running configuration stays.
	editConfig(t, dataDir, "max-conns: 10000", "max-conns: -5")
	out, err = reload()
	if err == nil || !strings.Contains(out, "max-conns") {
		t.Fatalf("tpd reload of a tpd.yaml with max-conns -5: %v; want a refusal naming max-conns:\n%s", err, out)
	}
	editConfig(t, dataDir, "max-conns: -5", "max-conns: 10000")
	roundTrip("after the refused reload")
	readPublic()

	// A setting only a restart can change: refused, naming it.
	// (listen is one too, but the --listen flag the test gives tpd wins over
	// tpd.yaml, on a reload as at start.)
	editConfig(t, dataDir, "reverse-zone: \"rev.tp.internal\"", "reverse-zone: \"rev2.tp.internal\"")
	out, err = reload()
	if err == nil || !strings.Contains(out, "needs a restart") || !strings.Contains(out, "reverse-zone") {
		t.Fatalf("tpd reload of a changed reverse-zone: %v; want a refusal naming reverse-zone as needing a restart:\n%s", err, out)
	}
	editConfig(t, dataDir, "reverse-zone: \"rev2.tp.internal\"", "reverse-zone: \"rev.tp.internal\"")

	// SIGHUP does the same: log-level debug, then a line that says so.
	editConfig(t, dataDir, "log-level: info", "log-level: debug")
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitLog(t, p.log, "changed=\"log-level: info → debug\"", 20*time.Second)
	roundTrip("after SIGHUP")
	readPublic()
}
