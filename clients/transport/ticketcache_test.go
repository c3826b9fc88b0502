package transport_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// ticketServer is a TLS 1.3 server on loopback that requires a client
// certificate from ca, issues session tickets, and answers each connection
// with one byte (so the client reads the ticket that comes before it).
func ticketServer(t testing.TB, ca *testpki.CA) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	cfg := &tls.Config{
		Certificates: []tls.Certificate{ca.ServerCert(t, "127.0.0.1")},
		ClientCAs:    ca.Pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS13,
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := tls.Server(c, cfg)
				_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
				if tc.Handshake() == nil {
					_, _ = tc.Write([]byte{1})
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// resumes makes one connection with cache and device cert, and reports whether
// it resumed a session.
func resumes(t *testing.T, addr string, ca *testpki.CA, cache tls.ClientSessionCache, cert tls.Certificate) bool {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{
		RootCAs:            ca.Pool,
		ServerName:         "127.0.0.1",
		Certificates:       []tls.Certificate{cert},
		ClientSessionCache: cache,
		MinVersion:         tls.VersionTLS13,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	if _, err := c.Read(b[:]); err != nil { // also takes in the ticket
		t.Fatal(err)
	}
	return c.ConnectionState().DidResume
}

// leafOf returns a Leaf func for TicketCache that reports *cur.
func leafOf(cur *atomic.Pointer[x509.Certificate]) func() *x509.Certificate {
	return func() *x509.Certificate { return cur.Load() }
}

// A ticket one process kept in the file resumes the next process's session
// (a new TicketCache on the same file), and the file is private (0600).
func TestTicketCacheResumesAcrossProcesses(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	addr := ticketServer(t, ca)
	cert := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	var cur atomic.Pointer[x509.Certificate]
	cur.Store(cert.Leaf)
	file := filepath.Join(t.TempDir(), "tickets.json")

	first := &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}
	if resumes(t, addr, ca, first, cert) {
		t.Fatal("the first connection resumed with an empty cache")
	}
	fi, err := os.Stat(file)
	if err != nil {
		t.Fatalf("no ticket file after a connection that received a ticket: %v", err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 && os.PathSeparator == '/' {
		t.Errorf("ticket file mode %v, want 0600", mode)
	}
	second := &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}
	if !resumes(t, addr, ca, second, cert) {
		t.Fatal("a new process (a new cache on the same file) did not resume")
	}
	memOnly := &transport.TicketCache{Leaf: leafOf(&cur)}
	if resumes(t, addr, ca, memOnly, cert) {
		t.Fatal("a cache without a Path resumed: it read a file it was not given")
	}
	if !resumes(t, addr, ca, memOnly, cert) {
		t.Fatal("a memory-only cache did not resume its own session")
	}
}

// Tickets are offered only with the certificate they were made with, and only
// while it is not due for renewal (a resumed handshake presents no certificate,
// so renewal needs a full one); without a certificate, none is offered.
func TestTicketCacheBoundToCertificate(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	addr := ticketServer(t, ca)
	file := filepath.Join(t.TempDir(), "tickets.json")
	old := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	var cur atomic.Pointer[x509.Certificate]
	cur.Store(old.Leaf)
	cache := &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}
	resumes(t, addr, ca, cache, old)
	if !resumes(t, addr, ca, &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}, old) {
		t.Fatal("setup: the same certificate did not resume")
	}

	renewed := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	cur.Store(renewed.Leaf)
	if resumes(t, addr, ca, &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}, renewed) {
		t.Fatal("a ticket made with the previous certificate resumed after dlogin renewed it")
	}

	// A certificate in the last third of its life: no ticket, so the full
	// handshake can ask for (and renew) the certificate.
	now := time.Now()
	aging := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{NotBefore: now.Add(-3 * time.Hour), NotAfter: now.Add(time.Hour)})
	cur.Store(aging.Leaf)
	c := &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}
	resumes(t, addr, ca, c, aging)
	if resumes(t, addr, ca, c, aging) {
		t.Fatal("a certificate due for renewal resumed a session")
	}

	cur.Store(nil)
	if _, ok := (&transport.TicketCache{Path: file, Leaf: leafOf(&cur)}).Get("127.0.0.1"); ok {
		t.Fatal("a ticket was offered with no certificate at hand")
	}
}

// Bad files cost only full handshakes: a damaged file, one larger than the
// bound, entries past their certificate's end, and more entries than the bound.
func TestTicketCacheBadFiles(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	addr := ticketServer(t, ca)
	cert := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	var cur atomic.Pointer[x509.Certificate]
	cur.Store(cert.Leaf)
	dir := t.TempDir()

	for name, content := range map[string][]byte{
		"damaged JSON": []byte(`{"tickets":[{"key":`),
		"over 256 KiB": append([]byte(`{"tickets":[],"pad":"`), append(bytes.Repeat([]byte("x"), 300<<10), '"', '}')...),
		"wrong types":  []byte(`{"tickets":[{"key":1,"cert":[],"ticket":"!!"}]}`),
	} {
		file := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		if err := os.WriteFile(file, content, 0o600); err != nil {
			t.Fatal(err)
		}
		c := &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}
		if resumes(t, addr, ca, c, cert) {
			t.Fatalf("%s: resumed from a bad file", name)
		}
		if !resumes(t, addr, ca, &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}, cert) {
			t.Fatalf("%s: the file was not replaced by a good one after a full handshake", name)
		}
	}

	// An entry whose certificate has ended is dropped, even when the clock
	// that made it said otherwise.
	file := filepath.Join(dir, "expired")
	c := &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}
	resumes(t, addr, ca, c, cert)
	later := &transport.TicketCache{Path: file, Leaf: leafOf(&cur), Now: func() time.Time { return cert.Leaf.NotAfter.Add(time.Second) }}
	if _, ok := later.Get("127.0.0.1"); ok {
		t.Fatal("a ticket was offered after its certificate's end")
	}

	// More server names than the bound: the file keeps at most the bound.
	file = filepath.Join(dir, "many")
	c = &transport.TicketCache{Path: file, Leaf: leafOf(&cur)}
	resumes(t, addr, ca, c, cert)
	cs, ok := c.Get("127.0.0.1")
	if !ok {
		t.Fatal("setup: no ticket")
	}
	for i := range transport.MaxTickets + 10 {
		c.Put("name-"+strings.Repeat("x", i), cs)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var got struct{ Tickets []json.RawMessage }
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Tickets) > transport.MaxTickets {
		t.Fatalf("ticket file holds %d entries, bound is %d", len(got.Tickets), transport.MaxTickets)
	}
	// Put(nil), crypto/tls's "forget this session", reaches the file.
	last := []byte(`"key":"name-` + strings.Repeat("x", transport.MaxTickets+9) + `"`)
	if !bytes.Contains(b, last) {
		t.Fatal("the newest entry is not in the file")
	}
	c.Put("name-"+strings.Repeat("x", transport.MaxTickets+9), nil)
	if b, _ := os.ReadFile(file); bytes.Contains(b, last) {
		t.Fatal("a forgotten session is still in the file")
	}
}

// BenchmarkTLSHandshake is what a new TLS connection to tpd costs both ends
// together (in one process, on loopback, with a device certificate): a full
// handshake, one resumed from a ticket as tp now does, and one resumed with
// X25519 alone, which shows what the post-quantum half of the key exchange
// (ML-KEM-768, on every handshake, resumed or not) adds.
func BenchmarkTLSHandshake(b *testing.B) {
	ca := testpki.New(b)
	cert := ca.ClientCert(b, "alice@laptop", testpki.LeafOptions{})
	var cur atomic.Pointer[x509.Certificate]
	cur.Store(cert.Leaf)
	for _, bc := range []struct {
		name   string
		resume bool
		curves []tls.CurveID
	}{
		{"full", false, nil},
		{"resumed", true, nil},
		{"resumed-x25519-only", true, []tls.CurveID{tls.X25519}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			addr := ticketServer(b, ca)
			var cache tls.ClientSessionCache
			if bc.resume {
				cache = &transport.TicketCache{Leaf: leafOf(&cur)}
			}
			cfg := &tls.Config{
				RootCAs: ca.Pool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{cert},
				ClientSessionCache: cache, MinVersion: tls.VersionTLS13, CurvePreferences: bc.curves,
			}
			dial := func() bool {
				c, err := tls.Dial("tcp", addr, cfg)
				if err != nil {
					b.Fatal(err)
				}
				var one [1]byte
				if _, err := c.Read(one[:]); err != nil {
					b.Fatal(err)
				}
				c.Close()
				return c.ConnectionState().DidResume
			}
			dial() // the ticket
			resumed := 0
			b.ResetTimer()
			for b.Loop() {
				if dial() {
					resumed++
				}
			}
			b.ReportMetric(float64(resumed)/float64(b.N), "resumed/op")
		})
	}
}
