package e2e

import (
	"crypto/tls"
	"net"
	"os"
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
	rootPEM, pool := rootOf(t, srv)

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

	_, port, _ := net.SplitHostPort(srv.Addr)
	dom, stderr := newBrowser(t, rootPEM).dom(t, "www.test", "https://www.test:"+port+"/")
	if !strings.Contains(dom, `<p id="static">Served by TP</p>`) || !strings.Contains(dom, `<p id="out">rendered by script</p>`) {
		t.Fatalf("rendered DOM lacks the page (certificate not trusted?):\n%s\nstderr:\n%s", dom, stderr)
	}
	if !strings.Contains(srv.log.String(), "site=www.test") {
		t.Errorf("no access log line for the browser's request:\n%s", srv.log.String())
	}
}
