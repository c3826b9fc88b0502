package tpd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// Two tpd on one database with the same site, started together: the site's
// certificate is ordered once between them (certmagic's lock is a row in
// PostgreSQL, so the instance that did not take it waits, then finds the
// certificate stored) and both present that same certificate; nothing is
// written to either data dir's sites directory. A third instance started
// later loads it from the database without ordering.
func TestPGSitesShareOneCertificate(t *testing.T) {
	t.Parallel()
	oneSiteACMEAtATime(t)
	_, dsn := testpg.NewDatabase(t)
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	withSite := func(cfg config.Server) config.Server {
		cfg.Sites = []config.Site{{Name: "www.test", Root: root}}
		return cfg
	}
	cfgA := withSite(pgDataDir(t, dsn, nil))
	cfgB := withSite(pgDataDir(t, dsn, &cfgA))
	cfgC := withSite(pgDataDir(t, dsn, &cfgA))
	a := runDaemon(t, cfgA)
	b := runDaemon(t, cfgB)

	roots := x509.NewCertPool()
	roots.AddCert(a.d.pki.Root)
	leafA := waitPresented(t, a.addr, "www.test", roots)
	leafB := waitPresented(t, b.addr, "www.test", roots)
	if leafA.SerialNumber.Cmp(leafB.SerialNumber) != 0 {
		t.Fatalf("A presents serial %x and B %x for www.test: both ordered a certificate", leafA.SerialNumber, leafB.SerialNumber)
	}
	c := runDaemon(t, cfgC)
	if leafC := waitPresented(t, c.addr, "www.test", roots); leafC.SerialNumber.Cmp(leafA.SerialNumber) != 0 {
		t.Fatalf("C, started after the order, presents serial %x, not the stored %x", leafC.SerialNumber, leafA.SerialNumber)
	}
	// certmagic logs each attempt of an order (it retries a failed one under
	// the same lock): count the instances that ordered.
	ordered := 0
	for _, r := range []*daemonRun{a, b, c} {
		for _, line := range strings.Split(r.logs.String(), "\n") {
			if strings.Contains(line, `msg="obtaining certificate"`) && strings.Contains(line, "www.test") {
				ordered++
				break
			}
		}
	}
	if ordered != 1 {
		t.Fatalf("%d of three instances ordered www.test; want one.\nA:\n%s\nB:\n%s", ordered, a.logs.String(), b.logs.String())
	}
	for _, cfg := range []config.Server{cfgA, cfgB, cfgC} {
		if m, _ := filepath.Glob(filepath.Join(cfg.SitesDir(), "certificates", "*", "www.test", "*")); len(m) != 0 {
			t.Fatalf("%s holds %q: the certificate went to the data dir, not the database", cfg.SitesDir(), m)
		}
	}
	var keys int
	if err := a.d.db.Pool().QueryRow(context.Background(),
		"SELECT count(*) FROM tp_certmagic WHERE key LIKE 'certificates/%/www.test/%'").Scan(&keys); err != nil || keys == 0 {
		t.Fatalf("the database holds %d keys for www.test's certificate (%v)", keys, err)
	}
}

// waitPresented polls until addr presents a certificate for name that roots
// verify (certmagic obtains it in the background), and returns it.
func waitPresented(t *testing.T, addr, name string, roots *x509.CertPool) *x509.Certificate {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
			&tls.Config{ServerName: name, RootCAs: roots, NextProtos: []string{"http/1.1"}})
		if err == nil {
			leaf := c.ConnectionState().PeerCertificates[0]
			c.Close()
			return leaf
		}
		if time.Now().After(deadline) {
			t.Fatalf("no certificate for %s on %s within 90s: %v", name, addr, err)
		}
		time.Sleep(50 * time.Millisecond) // polling for certmagic, bounded by the deadline above
	}
}

// tpd migrate moves the sites directory too: a single tpd obtained www.test's
// certificate into DATA_DIR/sites; after the migration the same data dir on
// PostgreSQL (on another port, so another ACME directory URL) presents that
// certificate without ordering one.
func TestPGMigrateSites(t *testing.T) {
	t.Parallel()
	oneSiteACMEAtATime(t)
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := newDataDir(t, map[string]string{"tp.rego": allowAlice})
	cfg.Sites = []config.Site{{Name: "www.test", Root: root}}
	r := runDaemon(t, cfg)
	roots := x509.NewCertPool()
	roots.AddCert(r.d.pki.Root)
	before := waitPresented(t, r.addr, "www.test", roots)
	r.stop()

	_, dsn := testpg.NewDatabase(t)
	cfg.Database, cfg.DatabasePassword = dsn, testpg.Password
	res, err := Migrate(context.Background(), cfg, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.SiteFiles < 3 { // the certificate, its key, its metadata, the account
		t.Fatalf("migrate moved %d site files; want the certificate, its key and metadata, and the account", res.SiteFiles)
	}
	r2 := runDaemon(t, cfg)
	after := waitPresented(t, r2.addr, "www.test", roots)
	if after.SerialNumber.Cmp(before.SerialNumber) != 0 {
		t.Fatalf("after the migration www.test has serial %x, not the migrated %x", after.SerialNumber, before.SerialNumber)
	}
	if strings.Contains(r2.logs.String(), `msg="obtaining certificate"`) {
		t.Fatalf("the migrated instance ordered a certificate:\n%s", r2.logs.String())
	}
}
