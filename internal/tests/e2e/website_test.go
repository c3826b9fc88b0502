package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A real browser loads a site through tpd's public port, trusting TP's root from
// an NSS database as a user would, and renders it (the script on the page runs):
// headless Chromium from Debian's chromium package. No client certificate is
// asked for: the website's handshake sends no CertificateRequest.
func TestBrowserLoadsSite(t *testing.T) {
	parallel(t)
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is not installed: apt-get install chromium libnss3-tools (deploy/test.sh does, run as root)")
	}
	certutil, err := exec.LookPath("certutil")
	if err != nil {
		t.Fatal("certutil is not installed: apt-get install libnss3-tools (deploy/test.sh does, run as root)")
	}
	root := t.TempDir()
	page := `<!doctype html><html><head><title>TP site</title></head><body>
<p id="static">Served by TP</p><p id="out">not rendered</p>
<script>document.getElementById("out").textContent = "rendered by " + "script";</script>
</body></html>`
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte(page), 0o644); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(t.TempDir(), "tpd.yaml")
	if err := os.WriteFile(conf, []byte("sites:\n  - {name: www.test, root: \""+root+"\"}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, "", "TP_CONFIG="+conf)
	rootPEM := filepath.Join(srv.DataDir, "ca", "root.crt")
	pem, err := os.ReadFile(rootPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)

	// The site's certificate comes from the embedded CA over ACME in the background.
	var asked bool
	deadline := time.Now().Add(90 * time.Second)
	for {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", srv.Addr, &tls.Config{
			ServerName: "www.test", RootCAs: pool, NextProtos: []string{"h2", "http/1.1"},
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				asked = true
				return &tls.Certificate{}, nil
			},
		})
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("www.test has no certificate within 90s: %v\n%s", err, srv.log.String())
		}
		time.Sleep(100 * time.Millisecond) // polling for certmagic, bounded by the deadline above
	}
	if asked {
		t.Error("the website's handshake asked for a client certificate")
	}

	home := t.TempDir()
	nssdb := filepath.Join(home, ".pki", "nssdb")
	if err := os.MkdirAll(nssdb, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(certutil, "-d", "sql:"+nssdb, "-N", "--empty-password").CombinedOutput(); err != nil {
		t.Fatalf("certutil -N: %v\n%s", err, out)
	}
	if out, err := exec.Command(certutil, "-d", "sql:"+nssdb, "-A", "-t", "C,,", "-n", "TP root", "-i", rootPEM).CombinedOutput(); err != nil {
		t.Fatalf("certutil -A: %v\n%s", err, out)
	}
	_, port, _ := net.SplitHostPort(srv.Addr)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := commandContext(ctx, chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--user-data-dir="+filepath.Join(home, "profile"),
		"--host-resolver-rules=MAP www.test 127.0.0.1",
		"--dump-dom", "https://www.test:"+port+"/")
	cmd.Env = append(os.Environ(), "HOME="+home)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium: %v\nstderr:\n%s", err, stderr.String())
	}
	dom := string(out)
	if !strings.Contains(dom, `<p id="static">Served by TP</p>`) || !strings.Contains(dom, `<p id="out">rendered by script</p>`) {
		t.Fatalf("rendered DOM lacks the page (certificate not trusted?):\n%s\nstderr:\n%s", dom, stderr.String())
	}
	if !strings.Contains(srv.log.String(), "site=www.test") {
		t.Errorf("no access log line for the browser's request:\n%s", srv.log.String())
	}
}
