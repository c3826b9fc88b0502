package acme

import (
	"context"
	"encoding/base64"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	acmeproto "github.com/mholt/acmez/v3/acme"

	"github.com/tp-proxy/tp/acme/login"
)

// Nonces are single use, expire, and the store never holds more than its bound:
// the oldest goes first. Bad input: a flood of nonce requests, a nonce used
// twice, a stale one, one that was never issued.
func TestNonceStoreBounded(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	s := newNonceStore(100)
	s.now = func() time.Time { return now }
	first, err := s.create()
	if err != nil {
		t.Fatal(err)
	}
	second, _ := s.create()
	if !s.use(second) {
		t.Fatal("a fresh nonce was refused")
	}
	if s.use(second) {
		t.Fatal("a nonce was accepted twice")
	}
	for i := 0; i < 10_000; i++ {
		if _, err := s.create(); err != nil {
			t.Fatal(err)
		}
		if s.len() > 100 {
			t.Fatalf("%d nonces held, bound is 100", s.len())
		}
	}
	if s.use(first) {
		t.Fatal("the oldest nonce survived 10000 newer ones in a store of 100")
	}
	young, _ := s.create()
	now = now.Add(nonceTTL + time.Second)
	if s.use(young) {
		t.Fatal("an expired nonce was accepted")
	}
	for _, bad := range []string{"", "x", strings.Repeat("A", 22), strings.Repeat("A", 400), "!!!!!!!!!!!!!!!!!!!!!!"} {
		if s.use(bad) {
			t.Errorf("never-issued nonce %q accepted", bad)
		}
	}
	// Everything expired is swept by the next create.
	s.create()
	if s.len() != 1 {
		t.Errorf("%d nonces held after all expired and one was made", s.len())
	}

	// A large bound is not allocated up front; the store grows to it in order.
	s = newNonceStore(3000)
	s.now = func() time.Time { return now }
	if len(s.queue) > 1024 {
		t.Errorf("a store of 3000 allocated %d entries at once", len(s.queue))
	}
	first, _ = s.create()
	var last string
	for i := 0; i < 2500; i++ {
		last, _ = s.create()
	}
	if !s.use(first) || !s.use(last) {
		t.Fatal("nonces made before and after the store grew were lost")
	}
	for i := 0; i < 10_000; i++ {
		last, _ = s.create()
	}
	if s.len() > 3000 || len(s.queue) != 3000 || !s.use(last) {
		t.Errorf("after 12500 nonces: %d held, ring of %d, newest usable: %v", s.len(), len(s.queue), s.use(last))
	}
}

// HEAD new-nonce writes nothing to the CA database (it used to store every
// nonce until used, for ever), and the nonce it returns works for an ACME request.
func TestNoncesNotStored(t *testing.T) {
	ts := newTestServerWith(t, CAOptions{MaxNonces: 200})
	for i := 0; i < 500; i++ {
		req, _ := http.NewRequest(http.MethodHead, ts.URL+"/acme/tp/new-nonce", nil)
		resp, err := ts.HC.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Replay-Nonce") == "" {
			t.Fatalf("new-nonce: status %d, nonce %q", resp.StatusCode, resp.Header.Get("Replay-Nonce"))
		}
	}
	if n := countBucket(t, ts.CA, bucketNonces); n != 0 {
		t.Errorf("%d nonces in the CA database after 500 new-nonce requests, want 0", n)
	}
	if n := ts.CA.Nonces(); n > 200 {
		t.Errorf("%d nonces held, bound is 200", n)
	}
	// The whole login (nonces from responses, badNonce retries) still works.
	enr, _ := ts.Users.Enroll("alice", "laptop", nil, time.Hour)
	devKey := newKey(t)
	if _, err := login.EnrollDevice(context.Background(), ts.HC, ts.URL, enr.Token, devKey); err != nil {
		t.Fatal(err)
	}
	if _, err := login.Login(context.Background(), ts.HC, ts.URL, "alice@laptop", devKey, nil); err != nil {
		t.Fatal(err)
	}
}

// Oversize bodies are refused with 413 and a sentence before step-ca reads them
// (it read them whole, without a limit). Bad input: 1 MiB and 100 KiB bodies,
// with and without a Content-Length.
func TestOversizeBodyRefused(t *testing.T) {
	ts := newTestServer(t)
	big := strings.Repeat("a", 1<<20)
	for _, tc := range []struct {
		name, path, ctype string
		body              io.Reader
		wantText          string
	}{
		{"acme 1 MiB", "/acme/tp/new-account", "application/jose+json", strings.NewReader(big), "larger than 64 KiB"},
		{"acme 100 KiB chunked", "/acme/tp/new-order", "application/jose+json", io.MultiReader(strings.NewReader(big[:100<<10])), "larger than 64 KiB"},
		{"enroll 1 MiB", login.PathEnroll, "application/json", strings.NewReader(`{"token":"` + big + `"}`), "larger than 16 KiB"},
		{"attest 100 KiB chunked", login.PathAttest, "application/json", io.MultiReader(strings.NewReader(`{"device_id":"` + big[:100<<10] + `"}`)), "larger than 16 KiB"},
	} {
		resp, err := ts.HC.Post(ts.URL+tc.path, tc.ctype, tc.body)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(b), tc.wantText) {
			t.Errorf("%s: status %d %s, want 413 saying %q", tc.name, resp.StatusCode, b, tc.wantText)
		}
	}
	// A body under the bound still reaches step-ca, which judges it.
	resp, err := ts.HC.Post(ts.URL+"/acme/tp/new-account", "application/jose+json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("small malformed JWS: status %d, want step-ca's 400", resp.StatusCode)
	}
}

func countBucket(t *testing.T, c *CA, bucket []byte) int {
	t.Helper()
	entries, err := c.list(bucket)
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// Prune removes what finished logins left (accounts, orders, authorizations,
// challenges, certificate records, EAB keys, nonces stored by older versions,
// expired certificates) once older than the retention, and keeps the rest: a
// newer login's records and the websites' account with its pending order. A
// login after pruning works, so step-ca's indexes stay consistent.
func TestPruneRemovesOldLoginsKeepsLiveState(t *testing.T) {
	ts := newTestServerWith(t, CAOptions{SiteNames: []string{"www.example.test"}})
	ctx := context.Background()
	c := ts.CA
	enr, _ := ts.Users.Enroll("alice", "laptop", nil, 24*time.Hour)
	devKey := newKey(t)
	if _, err := login.EnrollDevice(ctx, ts.HC, ts.URL, enr.Token, devKey); err != nil {
		t.Fatal(err)
	}
	doLogin := func() {
		t.Helper()
		if _, err := login.Login(ctx, ts.HC, ts.URL, "alice@laptop", devKey, nil); err != nil {
			t.Fatal(err)
		}
	}

	// Old state: a login, an EAB key nobody used, nonces an older tpd stored, and
	// the websites' account (certmagic keeps it) with a pending order.
	doLogin()
	if _, _, err := c.NewEAB(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := c.acmeDB.CreateNonce(ctx); err != nil { // step-ca's own, stored nonce
			t.Fatal(err)
		}
	}
	siteAcct, siteOrder := siteAccountWithOrder(t, ts)

	// step-ca stamps records to the second: the next login is in a later second.
	tB := time.Now().UTC().Truncate(time.Second).Add(time.Second)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(tB); {
		if time.Now().After(deadline) {
			t.Fatal("clock does not move")
		}
		time.Sleep(10 * time.Millisecond)
	}
	doLogin()

	before := map[string]int{}
	for _, b := range [][]byte{bucketAccounts, bucketOrders, bucketAuthzs, bucketChallenges, bucketACMECerts, bucketSerialCerts, bucketX509Certs, bucketAccountByKeyID} {
		before[string(b)] = countBucket(t, c, b)
	}

	const retention = 48 * time.Hour
	// Now is such that the first login is older than the retention, the second not.
	st, err := c.Prune(ctx, tB.Add(retention), retention)
	if err != nil {
		t.Fatal(err)
	}
	want := PruneStats{Nonces: 3, EABKeys: 2, Accounts: 1, Orders: 1, Authorizations: 1, Challenges: 1, ACMECertificates: 1}
	if st != want {
		t.Errorf("pruned %+v\nwant   %+v", st, want)
	}
	for b, n := range map[string]int{
		"acme_accounts": before["acme_accounts"] - 1, "acme_keyID_accountID_index": before["acme_keyID_accountID_index"] - 1,
		"acme_orders": before["acme_orders"] - 1, "acme_authzs": before["acme_authzs"] - 1,
		"acme_challenges": before["acme_challenges"] - 1, "acme_certs": before["acme_certs"] - 1,
		"acme_serial_certs_index": before["acme_serial_certs_index"] - 1, "x509_certs": before["x509_certs"],
		"nonces": 0,
	} {
		if got := countBucket(t, c, []byte(b)); got != n {
			t.Errorf("%s: %d records after pruning, want %d", b, got, n)
		}
	}
	// The websites' account and its pending order are untouched; step-ca can still
	// walk the account's orders (it fails on an indexed order that is gone).
	ids, err := c.acmeDB.GetOrdersByAccountID(ctx, siteAcct)
	if err != nil || len(ids) != 1 || ids[0] != siteOrder {
		t.Errorf("websites' orders after pruning: %v, %v; want [%s]", ids, err, siteOrder)
	}

	// Much later every certificate has expired: their records go too, and so
	// does the second login's account. The websites' account stays.
	if st, err = c.Prune(ctx, tB.Add(retention+DefaultCertLifetime+time.Hour), retention); err != nil {
		t.Fatal(err)
	}
	if st.Certificates != 2 || st.Accounts != 1 {
		t.Errorf("second prune: %+v; want the 2 expired certificates and the second login's account", st)
	}
	if n := countBucket(t, c, bucketAccounts); n != 1 {
		t.Errorf("%d accounts left, want the websites' one", n)
	}
	if _, err := c.acmeDB.GetAccount(ctx, siteAcct); err != nil {
		t.Errorf("websites' account: %v", err)
	}
	keys, _, err := c.acmeDB.GetExternalAccountKeys(ctx, sitesProvisionerID, "", 0)
	if err != nil || len(keys) != 1 || keys[0].AccountID != siteAcct {
		t.Errorf("websites' account binding: %v, %v", keys, err)
	}
	doLogin() // consistent enough for step-ca to serve a whole login
}

// siteAccountWithOrder makes the websites' ACME account as certmagic does (EAB
// from NewSiteEAB) and a pending order, and returns their IDs.
func siteAccountWithOrder(t *testing.T, ts *testServer) (account, order string) {
	t.Helper()
	ctx := context.Background()
	kid, hmac, err := ts.CA.NewSiteEAB(ctx)
	if err != nil {
		t.Fatal(err)
	}
	client := &acmeproto.Client{Directory: ts.URL + SitesDirectoryPath(), HTTPClient: ts.HC}
	acct := acmeproto.Account{TermsOfServiceAgreed: true, PrivateKey: newKey(t)}
	if err := acct.SetExternalAccountBinding(ctx, client, acmeproto.EAB{KeyID: kid, MACKey: base64.RawURLEncoding.EncodeToString(hmac)}); err != nil {
		t.Fatal(err)
	}
	if acct, err = client.NewAccount(ctx, acct); err != nil {
		t.Fatal(err)
	}
	o, err := client.NewOrder(ctx, acct, acmeproto.Order{Identifiers: []acmeproto.Identifier{{Type: "dns", Value: "www.example.test"}}})
	if err != nil {
		t.Fatal(err)
	}
	return lastSegment(acct.Location), lastSegment(o.Location)
}

func lastSegment(u string) string { return u[strings.LastIndex(u, "/")+1:] }
