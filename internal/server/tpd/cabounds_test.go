package tpd

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	acmeproto "github.com/mholt/acmez/v3/acme"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/lib/config"
)

// The token bucket per source: a burst, then refusals that say how long to wait,
// refills with time; IPv6 sources share a bucket per /64; the table of sources
// never holds more than its bound, forgetting the least recently seen first.
func TestSourceLimiter(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_000_000, 0)
	l := newSourceLimiter(2, 3) // 2 per second, burst 3
	l.now = func() time.Time { return now }
	a := netip.MustParseAddr("192.0.2.1")
	for i := 0; i < 3; i++ {
		if ok, _ := l.allow(a); !ok {
			t.Fatalf("request %d of a burst of 3 refused", i+1)
		}
	}
	ok, wait := l.allow(a)
	if ok || wait != 500*time.Millisecond {
		t.Fatalf("4th request: ok=%v wait=%s, want refused, wait 500ms", ok, wait)
	}
	if ok, _ := l.allow(netip.MustParseAddr("192.0.2.2")); !ok {
		t.Fatal("another source was refused")
	}
	now = now.Add(time.Second) // two tokens back
	for i := 0; i < 2; i++ {
		if ok, _ := l.allow(a); !ok {
			t.Fatalf("request %d after a second refused", i+1)
		}
	}
	if ok, _ := l.allow(a); ok {
		t.Fatal("refill went beyond the rate")
	}
	// One /64 is one source; ::ffff:192.0.2.1 is 192.0.2.1.
	v6a, v6b := netip.MustParseAddr("2001:db8:1:2::1"), netip.MustParseAddr("2001:db8:1:2:ffff::9")
	for i := 0; i < 3; i++ {
		l.allow(sourceKey(v6a))
	}
	if ok, _ := l.allow(sourceKey(v6b)); ok {
		t.Error("another address of the same IPv6 /64 got its own bucket")
	}
	if ok, _ := l.allow(sourceKey(netip.MustParseAddr("::ffff:192.0.2.1"))); ok {
		t.Error("an IPv4-mapped address got its own bucket")
	}
	// The table is bounded; the least recently seen source is forgotten.
	l = newSourceLimiter(1, 1)
	l.max = 2
	l.now = func() time.Time { return now }
	x, y, z := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2"), netip.MustParseAddr("198.51.100.3")
	l.allow(x)
	l.allow(y)
	l.allow(z) // forgets x
	if l.len() != 2 {
		t.Fatalf("%d sources held, bound is 2", l.len())
	}
	if ok, _ := l.allow(y); ok {
		t.Error("y was forgotten instead of x, the least recently seen")
	}
	if ok, _ := l.allow(x); !ok {
		t.Error("x was not forgotten")
	}
}

// sourceClient is an HTTPS client for tpd whose connections come from src, a
// loopback address (Linux routes all of 127.0.0.0/8 to lo).
func sourceClient(t testing.TB, d *Daemon, src string, conns int) *http.Client {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(d.pki.Root)
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
	tr := &http.Transport{
		DialContext:         dialer.DialContext,
		TLSClientConfig:     &tls.Config{RootCAs: roots},
		MaxIdleConnsPerHost: conns,
		MaxConnsPerHost:     conns,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

func do(t testing.TB, hc *http.Client, method, url, ctype, body string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// One source over its limit gets 429 with Retry-After and a sentence, from the
// ACME API (as an ACME rateLimited problem) and from enrollment (as TP's JSON
// error); another source is unaffected and logs in. Bad input: 40 requests
// in a row from 127.0.0.2 against a burst of 30.
func TestCARateLimitPerSource(t *testing.T) {
	t.Parallel()
	d, url := startDaemonCfg(t, allowAlice, func(c *config.Server) {
		c.CARateLimit = 0.01 // one token per 100 s: no refill during the test
		c.CARateBurst = 30
	})
	flood := sourceClient(t, d, "127.0.0.2", 1)
	for i := 0; i < 30; i++ {
		if resp, b := do(t, flood, http.MethodHead, url+"/acme/tp/new-nonce", "", ""); resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d of the burst: status %d %s", i+1, resp.StatusCode, b)
		}
	}
	resp, b := do(t, flood, http.MethodHead, url+"/acme/tp/new-nonce", "", "")
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("31st request: status %d, want 429", resp.StatusCode)
	}
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || s < 1 || s > 100 {
		t.Errorf("Retry-After %q, want whole seconds up to 100", resp.Header.Get("Retry-After"))
	}
	resp, b = do(t, flood, http.MethodGet, url+acme.DirectoryPath(), "", "")
	var prob struct{ Type, Detail string }
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Content-Type") != "application/problem+json" ||
		json.Unmarshal(b, &prob) != nil || prob.Type != "urn:ietf:params:acme:error:rateLimited" ||
		!strings.Contains(prob.Detail, "127.0.0.2") || !strings.Contains(prob.Detail, "try again in") {
		t.Errorf("ACME directory over the limit: %d %q %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	resp, b = do(t, flood, http.MethodPost, url+login.PathEnroll, "application/json", `{"token":"x"}`)
	var le login.ErrorResponse
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" ||
		json.Unmarshal(b, &le) != nil || !strings.Contains(le.Error, "try again in") {
		t.Errorf("enrollment over the limit: %d %s", resp.StatusCode, b)
	}
	// The website beside them is not the CA's to limit.
	if resp, _ := do(t, flood, http.MethodGet, url+"/", "", ""); resp.StatusCode != http.StatusOK {
		t.Errorf("landing page from the limited source: %d", resp.StatusCode)
	}

	// 127.0.0.1 has its own bucket: a whole first login (root, enrollment,
	// attestation, ACME) fits in it.
	if resp, _ := do(t, sourceClient(t, d, "127.0.0.1", 1), http.MethodHead, url+"/acme/tp/new-nonce", "", ""); resp.StatusCode != http.StatusOK {
		t.Fatalf("another source: status %d", resp.StatusCode)
	}
	enrollClient(t, d, url, "alice", "laptop")
	d.limiter.mu.Lock()
	used := 30 - d.limiter.keys[netip.MustParseAddr("127.0.0.1")].Value.(*bucket[netip.Addr]).tokens
	d.limiter.mu.Unlock()
	t.Logf("a first login took %.0f requests of 127.0.0.1's burst (with one new-nonce before it)", used)
}

// The failure-mode test of the unauthenticated flood: 20,000 requests that need no certificate
// (new-nonce mostly, with ACME directory, new-account without an account binding,
// enrollment with a bad token and attestation for an unknown device) from one
// source. With the rate limit out of the way, the CA database file and the user
// store do not grow, the nonces held stay within ca-max-nonces, and a real login
// from another address succeeds afterwards. Before the fix each nonce was
// written to the database for good: 128 KiB grew to 8 MiB.
func TestUnauthenticatedFloodBounded(t *testing.T) { // not parallel: it measures the process's heap
	const (
		requests  = 20_000
		maxNonces = 1000
		workers   = 8
		// The flood writes nothing; the slack is for bbolt's own bookkeeping.
		dbSlack = 64 << 10
		// Everything in this process (client, server, TLS) may grow by this much.
		heapSlack = 64 << 20
	)
	d, url := startDaemonCfg(t, allowAlice, func(c *config.Server) {
		c.CARateLimit = 100_000
		c.CARateBurst = 1_000_000
		c.CAMaxNonces = maxNonces
	})
	dbFile := acme.DBPath(d.cfg.DataDir)
	size := func(path string) int64 {
		fi, err := os.Stat(path)
		if errors.Is(err, os.ErrNotExist) {
			return 0
		}
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	db0, users0 := size(dbFile), size(d.cfg.UsersFile())
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heap0 := ms.HeapAlloc

	hc := sourceClient(t, d, "127.0.0.2", workers)
	acmeClient := &acmeproto.Client{Directory: url + acme.DirectoryPath(), HTTPClient: hc}
	var next, refused atomic.Int64
	var firstErr sync.Once
	var floodErr error
	fail := func(err error) { firstErr.Do(func() { floodErr = err }) }
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > requests {
					return
				}
				var resp *http.Response
				var err error
				want := http.StatusOK
				switch i % 100 {
				case 1:
					resp, err = hc.Get(url + acme.DirectoryPath())
				case 2:
					resp, err = hc.Post(url+login.PathEnroll, "application/json", strings.NewReader(`{"token":"guess","public_key":"","signature":""}`))
					want = http.StatusBadRequest
				case 3:
					resp, err = hc.Post(url+login.PathAttest, "application/json", strings.NewReader(`{"device_id":"nobody@nowhere","public_key":"","time":"","signature":""}`))
					want = http.StatusForbidden
				case 4: // a real ACME client, without the binding the CA requires
					key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
					_, err := acmeClient.NewAccount(context.Background(), acmeproto.Account{TermsOfServiceAgreed: true, PrivateKey: key})
					var p acmeproto.Problem
					if !errors.As(err, &p) || p.Type != "urn:ietf:params:acme:error:externalAccountRequired" {
						fail(fmt.Errorf("new-account without a binding: %v", err))
					}
					continue
				default:
					req, _ := http.NewRequest(http.MethodHead, url+"/acme/tp/new-nonce", nil)
					resp, err = hc.Do(req)
				}
				if err != nil {
					fail(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusTooManyRequests {
					refused.Add(1)
				}
				if resp.StatusCode != want {
					fail(fmt.Errorf("request %d: status %d, want %d", i, resp.StatusCode, want))
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if floodErr != nil {
		t.Fatal(floodErr)
	}
	if refused.Load() != 0 {
		t.Fatalf("%d requests were rate limited: this test is about the bounds behind the limiter", refused.Load())
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	db1, users1 := size(dbFile), size(d.cfg.UsersFile())
	t.Logf("%d requests in %s (%.0f/s); CA database %d → %d bytes; nonces held %d; heap %d → %d KiB",
		requests, elapsed.Round(time.Millisecond), requests/elapsed.Seconds(), db0, db1, d.ca.Nonces(), heap0>>10, ms.HeapAlloc>>10)
	if db1 > db0+dbSlack {
		t.Errorf("CA database grew from %d to %d bytes under unauthenticated requests (bound: %d more)", db0, db1, dbSlack)
	}
	if users1 != users0 {
		t.Errorf("user store changed size (%d → %d) under unauthenticated requests", users0, users1)
	}
	if n := d.ca.Nonces(); n > maxNonces {
		t.Errorf("%d nonces held, ca-max-nonces is %d", n, maxNonces)
	}
	if ms.HeapAlloc > heap0+heapSlack {
		t.Errorf("heap grew from %d to %d KiB", heap0>>10, ms.HeapAlloc>>10)
	}
	if n := d.limiter.len(); n > maxRateSources {
		t.Errorf("rate limiter holds %d sources, bound is %d", n, maxRateSources)
	}
	// A legitimate login still succeeds.
	enrollClient(t, d, url, "alice", "laptop")
}

// enrollKey enrolls user@device with a fresh device key and returns the key.
func enrollKey(t *testing.T, d *Daemon, hc *http.Client, url, user, device string) *ecdsa.PrivateKey {
	t.Helper()
	enr, err := d.Users().Enroll(user, device, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := login.EnrollDevice(context.Background(), hc, url, enr.Token, key); err != nil {
		t.Fatal(err)
	}
	return key
}

// attest asks for an attestation and an account binding as dlogin does, and
// returns the status and body.
func attest(t *testing.T, hc *http.Client, url, deviceID string, devKey *ecdsa.PrivateKey) (*http.Response, []byte) {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKIXPublicKey(k.Public())
	pub := base64.StdEncoding.EncodeToString(der)
	ts := time.Now().UTC().Format(time.RFC3339)
	sig, err := login.SignMessage(devKey, login.AttestMessage(deviceID, pub, ts))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(login.AttestRequest{DeviceID: deviceID, PublicKey: pub, Time: ts, Signature: sig})
	return do(t, hc, http.MethodPost, url+login.PathAttest, "application/json", string(body))
}

// An enrolled device cannot mint account bindings (each a CA database record
// until pruned) without bound, from however many addresses: past the burst it
// gets 429 with Retry-After and a sentence naming it; another device is
// unaffected. Bad input: 101 attestations in a row from one device.
func TestDeviceBindingRateLimit(t *testing.T) {
	t.Parallel()
	d, url := startDaemonCfg(t, allowAlice, func(c *config.Server) { c.CARateBurst = 1_000_000 })
	hc := sourceClient(t, d, "127.0.0.1", 4)
	alice := enrollKey(t, d, hc, url, "alice", "laptop")
	bob := enrollKey(t, d, hc, url, "bob", "phone")
	// The bucket refills one binding every 10 s while the burst goes out: on a
	// loaded machine the burst takes that long, and that many more pass.
	start := time.Now()
	for i := 0; i < bindingBurst; i++ {
		if resp, b := attest(t, hc, url, "alice@laptop", alice); resp.StatusCode != http.StatusOK {
			t.Fatalf("attestation %d of the burst: %d %s", i+1, resp.StatusCode, b)
		}
	}
	resp, b := attest(t, hc, url, "alice@laptop", alice)
	for extra := 0; resp.StatusCode == http.StatusOK; extra++ {
		if refilled := int(time.Since(start).Seconds()*bindingRate) + 1; extra >= refilled {
			t.Fatalf("%d attestations past the burst of %d passed, in %s; the bucket refilled at most %d", extra+1, bindingBurst, time.Since(start).Round(time.Millisecond), refilled)
		}
		resp, b = attest(t, hc, url, "alice@laptop", alice)
	}
	var le login.ErrorResponse
	if resp.StatusCode != http.StatusTooManyRequests || json.Unmarshal(b, &le) != nil ||
		!strings.Contains(le.Error, `"alice@laptop" asked for too many certificates`) || !strings.Contains(le.Error, "try again in") {
		t.Fatalf("attestation past the burst: status %d, error %q; want 429 naming the device", resp.StatusCode, le.Error)
	}
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || s < 1 || s > 10 {
		t.Errorf("Retry-After %q, want whole seconds up to 10", resp.Header.Get("Retry-After"))
	}
	if resp, b := attest(t, hc, url, "bob@phone", bob); resp.StatusCode != http.StatusOK {
		t.Errorf("another device: %d %s", resp.StatusCode, b)
	}
}

// A person's browser over the limit on the sign-in pages gets a page that
// says so, not JSON. Bad input: two sign-ins from one source with a burst
// of one.
func TestRateLimitSignInPage(t *testing.T) {
	h := limitSources(newSourceLimiter(0.01, 1), http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	var w *httptest.ResponseRecorder
	for range 2 {
		r := httptest.NewRequest(http.MethodGet, "https://tp.test"+login.PathGrantSignIn+"?name=ci", nil)
		r.RemoteAddr = "192.0.2.7:40000"
		w = httptest.NewRecorder()
		h.ServeHTTP(w, r)
	}
	if w.Code != http.StatusTooManyRequests || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") ||
		!strings.Contains(w.Body.String(), "Too many requests from 192.0.2.7 to this TP server&#39;s sign-in pages; try again in") {
		t.Fatalf("the sign-in page over the limit: %d %q\n%s", w.Code, w.Header().Get("Content-Type"), w.Body.String())
	}
}
