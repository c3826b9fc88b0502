package tpd

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// discoveryClient is an HTTPS client without a client certificate that
// reaches the daemon's port whatever the URL's host and port say, so that a
// test can act as a client behind a port mapping.
func discoveryClient(t *testing.T, d *Daemon) *http.Client {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(d.pki.Root)
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", d.cfg.Listen)
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

func getDiscovery(t *testing.T, c *http.Client, method, u, body string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

// The document answers without a client certificate over h2, is cacheable,
// parses with the reader clients use, and names the host and port the client
// used: behind a port mapping (the client's Host says port 9443 while tpd
// listens elsewhere) the transports say 9443.
func TestDiscoveryDocument(t *testing.T) {
	t.Parallel()
	d := serveDaemon(t, allowAlice, func(c *config.Server) { c.PublicPorts = "20000-20010,8080/tcp" }, nil)
	c := discoveryClient(t, d)
	_, port, _ := net.SplitHostPort(d.cfg.Listen)

	for _, tc := range []struct {
		host     string
		wantPort int
	}{
		{"localhost:" + port, atoi(t, port)},
		{"localhost:9443", 9443}, // a port mapping: 9443 outside, the listener's port inside
		{"localhost", 443},       // no port in Host: HTTPS's
	} {
		resp, body := getDiscovery(t, c, http.MethodGet, "https://"+tc.host+wire.DiscoveryPath, "")
		if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
			t.Fatalf("Host %s: %s over %s: %s", tc.host, resp.Status, resp.Proto, body)
		}
		if ct, cc := resp.Header.Get("Content-Type"), resp.Header.Get("Cache-Control"); ct != "application/json" || !strings.Contains(cc, "max-age=") {
			t.Errorf("Host %s: Content-Type %q, Cache-Control %q", tc.host, ct, cc)
		}
		doc, err := wire.ParseDiscovery(body)
		if err != nil {
			t.Fatalf("Host %s: %v\n%s", tc.host, err, body)
		}
		if doc.Software != "tpd" || doc.Version != Version || doc.ALPN != wire.ALPN || doc.Chosen != nil {
			t.Errorf("Host %s: document %+v", tc.host, doc)
		}
		for _, name := range []string{wire.DiscoverQUIC, wire.DiscoverTLS} {
			tr, ok := doc.Find(name)
			if !ok || tr.Host != "localhost" || tr.Port != tc.wantPort {
				t.Errorf("Host %s: transport %s = %+v, %v; want localhost:%d", tc.host, name, tr, ok, tc.wantPort)
			}
		}
		if doc.Reverse == nil || doc.Reverse.Zone != d.cfg.ReverseZone || len(doc.Reverse.PublicPorts) != 2 ||
			doc.Reverse.PublicPorts[1] != (wire.DiscoveredPorts{Lo: 8080, Hi: 8080, Net: "tcp"}) {
			t.Errorf("Host %s: reverse %+v", tc.host, doc.Reverse)
		}
	}

	base := "https://localhost:" + port + wire.DiscoveryPath
	// The client's list in its order: the first the server offers is chosen;
	// names the server does not know and other parameters are ignored.
	for _, tc := range []struct{ method, query, body, want string }{
		{http.MethodGet, "?supports=wireguard,tls,quic&x=1", "", wire.DiscoverTLS},
		{http.MethodGet, "?supports=ssh&supports=quic", "", wire.DiscoverQUIC},
		{http.MethodGet, "?supports=QUIC%2Ctls", "", wire.DiscoverQUIC},
		{http.MethodGet, "?supports=ssh", "", ""},
		{http.MethodPost, "", `{"supports":["ssh","quic"],"client":"x"}`, wire.DiscoverQUIC},
	} {
		resp, body := getDiscovery(t, c, tc.method, base+tc.query, tc.body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s %s %s: %s: %s", tc.method, tc.query, tc.body, resp.Status, body)
		}
		doc, err := wire.ParseDiscovery(body)
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		if doc.Chosen != nil {
			got = doc.Chosen.Name
		}
		if got != tc.want {
			t.Errorf("%s %s %s: chosen %q, want %q", tc.method, tc.query, tc.body, got, tc.want)
		}
	}

	// Bounded input: each bad request is refused whole, with 400 or 405.
	long := strings.Repeat("a", wire.MaxDiscoveryNameLen+1)
	many := strings.TrimSuffix(strings.Repeat("tls,", wire.MaxDiscoverySupports+1), ",")
	for _, tc := range []struct {
		what, method, query, body string
		want                      int
	}{
		{"a query over the bound", http.MethodGet, "?x=" + strings.Repeat("y", wire.MaxDiscoveryRequestLen), "", 400},
		{"a name over the bound", http.MethodGet, "?supports=" + long, "", 400},
		{"too many names", http.MethodGet, "?supports=" + many, "", 400},
		{"a bad escape", http.MethodGet, "?supports=%zz", "", 400},
		{"a body over the bound", http.MethodPost, "", `{"supports":["` + strings.Repeat("x", wire.MaxDiscoveryRequestLen) + `"]}`, 400},
		{"a body that is not JSON", http.MethodPost, "", `supports=tls`, 400},
		{"a body with two objects", http.MethodPost, "", `{"supports":["tls"]}{}`, 400},
		{"a PUT", http.MethodPut, "", `{}`, 405},
	} {
		resp, body := getDiscovery(t, c, tc.method, base+tc.query, tc.body)
		if resp.StatusCode != tc.want {
			t.Errorf("%s: %s, want %d: %s", tc.what, resp.Status, tc.want, body)
		}
	}
	// A path below the document is not it.
	if resp, _ := getDiscovery(t, c, http.MethodGet, base+"/reverse-http/x", ""); resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET %s/reverse-http/x: %s, want 404", base, resp.Status)
	}

	// HTTP/3 answers the same document.
	pool := x509.NewCertPool()
	pool.AddCert(d.pki.Root)
	h3 := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: pool},
		Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, cfg *quic.Config) (*quic.Conn, error) {
			return quic.DialAddr(ctx, d.cfg.Listen, tlsCfg, cfg)
		}}
	defer h3.Close()
	resp, body := getDiscovery(t, &http.Client{Transport: h3, Timeout: 20 * time.Second}, http.MethodGet, base+"?supports=tls", "")
	if doc, err := wire.ParseDiscovery(body); resp.ProtoMajor != 3 || err != nil || doc.Chosen == nil || doc.Chosen.Name != wire.DiscoverTLS {
		t.Errorf("over HTTP/3: %s %s, %v: %s", resp.Proto, resp.Status, err, body)
	}
}

// Without QUIC the document offers no UDP transport at all.
func TestDiscoveryWithoutQUIC(t *testing.T) {
	t.Parallel()
	d := serveDaemon(t, allowAlice, func(c *config.Server) { c.QUIC = false }, nil)
	resp, body := getDiscovery(t, discoveryClient(t, d), http.MethodGet, "https://localhost"+wire.DiscoveryPath+"?supports=quic,tls", "")
	doc, err := wire.ParseDiscovery(body)
	if resp.StatusCode != http.StatusOK || err != nil {
		t.Fatalf("%s, %v: %s", resp.Status, err, body)
	}
	for _, tr := range doc.Transports {
		if tr.Network == "udp" {
			t.Errorf("QUIC is off, yet the document offers %+v", tr)
		}
	}
	if doc.Chosen == nil || doc.Chosen.Name != wire.DiscoverTLS {
		t.Errorf("supports=quic,tls without QUIC: chosen %+v, want tls", doc.Chosen)
	}
}

// On a proxy name the CONNECT proxy and the reverse-tunnel endpoints are
// advertised with that name; on tpd's own name with the first proxy name; the
// port is the client's in both cases. ProxyHTTP serves the document and
// nothing else.
func TestDiscoveryProxyNames(t *testing.T) {
	t.Parallel()
	h := discoveryHandler{discoveryOptions{QUIC: true, ProxyNames: []string{"proxy.example", "p2.example"}, ReverseZone: "rev.example"}}
	d := &Daemon{discovery: h}
	for _, tc := range []struct{ host, wantProxy string }{
		{"tp.example:8443", "proxy.example"},
		{"P2.example.:8443", "p2.example"},
	} {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodGet, "https://"+tc.host+wire.DiscoveryPath+"?supports=connect-h3", nil)
		req.Host = tc.host
		d.ProxyHTTP().ServeHTTP(rec, req)
		doc, err := wire.ParseDiscovery(rec.Body.Bytes())
		if err != nil {
			t.Fatalf("Host %s: %v: %s", tc.host, err, rec.Body)
		}
		c, ok := doc.Find(wire.DiscoverConnect)
		wantURL := "https://" + tc.wantProxy + ":8443"
		if !ok || c.Host != tc.wantProxy || c.Port != 8443 || c.URL != wantURL || c.Network != "tcp" {
			t.Errorf("Host %s: connect %+v, %v", tc.host, c, ok)
		}
		if doc.Chosen == nil || doc.Chosen.Name != wire.DiscoverConnectH3 || doc.Chosen.Network != "udp" {
			t.Errorf("Host %s: chosen %+v", tc.host, doc.Chosen)
		}
		if doc.Reverse == nil || doc.Reverse.HTTP != wantURL+"/.well-known/tp/reverse-http/{label}" ||
			doc.Reverse.ListenTCP != wantURL+"/.well-known/listen-tcp/{addr}/{port}/" {
			t.Errorf("Host %s: reverse %+v", tc.host, doc.Reverse)
		}
	}
	rec := httptest.NewRecorder()
	d.ProxyHTTP().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "https://proxy.example/other", nil))
	if rec.Code != http.StatusNotFound {
		t.Errorf("ProxyHTTP GET /other: %d, want 404", rec.Code)
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// discoveryDialer is alice's Dialer for d (transport auto) with a cache of its
// own and its QUIC address on a UDP socket the test reads: any packet there
// is an attempt at QUIC.
func discoveryDialer(t *testing.T, d *Daemon, c *clients.Client) (*clients.Dialer, *net.UDPConn) {
	t.Helper()
	dl, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dl.Close() })
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { udp.Close() })
	dl.Transport = clients.TransportAuto
	dl.QUICServer = udp.LocalAddr().String()
	dl.Cache = &clients.TransportCache{Path: filepath.Join(t.TempDir(), "transport-cache.json")}
	dl.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	return dl, udp
}

func pingThrough(t *testing.T, dl *clients.Dialer, echo string) {
	t.Helper()
	conn, err := dl.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatalf("dial %s: %v", echo, err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(conn, b); err != nil || string(b) != "ping" {
		t.Fatalf("echo through %s: %q, %v", dl.Server, b, err)
	}
}

// quicAttempted waits for a packet on udp for up to wait; zero wait looks
// only at what has already arrived, without waiting (loopback delivers a
// datagram into the receiving socket's queue before the sender's write
// returns).
func quicAttempted(t *testing.T, udp *net.UDPConn, wait time.Duration) bool {
	t.Helper()
	buf := make([]byte, 2048)
	if wait == 0 {
		return pending(t, udp, buf)
	}
	_ = udp.SetReadDeadline(time.Now().Add(wait))
	n, _, err := udp.ReadFromUDP(buf)
	return err == nil && n > 0
}

// A server without QUIC says so in its document, and tp, meeting it for the
// first time, goes straight to TLS: no datagram reaches the QUIC address. The
// document and the choice are remembered in the transport cache. The control:
// the same first meeting without a document (its URL answers 404) races, and
// the race's QUIC attempt is seen on the socket, so the socket does see one.
func TestClientSkipsQUICWhenNotOffered(t *testing.T) {
	t.Parallel()
	d := serveDaemon(t, allowAlice, func(c *config.Server) { c.QUIC = false }, nil)
	c, _, _ := enrollClient(t, d, d.cfg.PublicURL(), "alice", "laptop")
	echo := testnet.Echo(t)

	dl, udp := discoveryDialer(t, d, c)
	pingThrough(t, dl, echo)
	if quicAttempted(t, udp, 0) {
		t.Error("the server offers no QUIC, yet the client sent a datagram to its QUIC address")
	}
	if got := dl.Cache.Get(dl.Server); got != clients.TransportTLS {
		t.Errorf("the cache remembers transport %q, want tls", got)
	}
	doc, ok := dl.Cache.Discovery(dl.Server)
	if _, quic := doc.Find(wire.DiscoverQUIC); !ok || quic {
		t.Errorf("the cache's document: %+v, %v; want one without quic", doc, ok)
	}

	control, udp2 := discoveryDialer(t, d, c)
	control.DiscoveryURL = "https://" + control.Server + "/.well-known/not-tp"
	pingThrough(t, control, echo)
	if !quicAttempted(t, udp2, 20*time.Second) {
		t.Fatal("without a document the client did not race QUIC: the observation above proves nothing")
	}
	if _, ok := control.Cache.Discovery(control.Server); ok {
		t.Error("a 404 was remembered as a discovery document")
	}
}

// A document that cannot be had or read leaves tp as it was before discovery:
// it races QUIC against TLS (its datagram arrives) and connects, and nothing of
// the bad document is remembered. Each bad answer is served over HTTPS with a
// certificate the client trusts, so that only the answer is wrong.
func TestClientDiscoveryFallback(t *testing.T) {
	t.Parallel()
	d := serveDaemon(t, allowAlice, func(c *config.Server) { c.QUIC = false }, nil)
	c, _, _ := enrollClient(t, d, d.cfg.PublicURL(), "alice", "laptop")
	echo := testnet.Echo(t)
	good, err := json.Marshal(wire.Discovery{Schema: 1, Software: "tpd", Transports: []wire.DiscoveredTransport{
		{Name: "tls", Network: "tcp", Host: "127.0.0.1", Port: 1, ALPN: []string{"tp/1"}}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		what   string
		status int
		ctype  string
		body   []byte
	}{
		{"garbage", 200, "application/json", []byte("<html>not json</html>")},
		{"an oversize document", 200, "application/json", append(bytes.Repeat([]byte(" "), wire.MaxDiscoverySize), good...)},
		{"two documents", 200, "application/json", append(append([]byte{}, good...), good...)},
		{"a document of schema 2", 200, "application/json", bytes.Replace(good, []byte(`"schema":1`), []byte(`"schema":2`), 1)},
		{"a transport without a port", 200, "application/json", bytes.Replace(good, []byte(`"port":1`), []byte(`"port":0`), 1)},
		{"a good document as text/html", 200, "text/html", good},
		{"a 500", 500, "application/json", good},
		{"a redirect", 302, "application/json", good},
	} {
		t.Run(tc.what, func(t *testing.T) {
			bad := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", tc.ctype)
				w.Header().Set("Location", "https://127.0.0.1/elsewhere")
				w.WriteHeader(tc.status)
				_, _ = w.Write(tc.body)
			}))
			chain, key, leaf, err := d.pki.IssueServerCert([]string{"localhost", "127.0.0.1"}, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			bad.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: chain, PrivateKey: key, Leaf: leaf}}}
			bad.StartTLS()
			defer bad.Close()

			dl, udp := discoveryDialer(t, d, c)
			dl.DiscoveryURL = bad.URL + wire.DiscoveryPath
			// The fetch itself must work: only the answer is bad.
			if _, err := clients.FetchDiscovery(context.Background(), dl.DiscoveryURL, &tls.Config{RootCAs: rootPool(d), ServerName: "127.0.0.1"}); err == nil {
				t.Fatalf("FetchDiscovery accepted %s", tc.what)
			}
			pingThrough(t, dl, echo)
			if !quicAttempted(t, udp, 20*time.Second) {
				t.Error("after a bad document the client did not race QUIC as it did before discovery")
			}
			if _, ok := dl.Cache.Discovery(dl.Server); ok {
				t.Errorf("%s was remembered", tc.what)
			}
		})
	}
}

// With QUIC on, the first meeting fetches the document, races as before and
// QUIC wins; the cache then holds exactly the document the server serves, and
// a later Dialer on the same cache (another tp process) uses the remembered
// transport without fetching again.
func TestClientDiscoveryRoundTrip(t *testing.T) {
	t.Parallel()
	d := serveDaemon(t, allowAlice, nil, nil)
	c, _, _ := enrollClient(t, d, d.cfg.PublicURL(), "alice", "laptop")
	echo := testnet.Echo(t)
	dl, _ := discoveryDialer(t, d, c)
	dl.QUICServer = "" // tpd's own QUIC
	pingThrough(t, dl, echo)
	if got := dl.Cache.Get(dl.Server); got != clients.TransportQUIC {
		t.Errorf("transport %q remembered, want quic", got)
	}
	cached, ok := dl.Cache.Discovery(dl.Server)
	if !ok {
		t.Fatal("no document remembered")
	}
	served, err := clients.FetchDiscovery(context.Background(), "https://"+dl.Server+wire.DiscoveryPath, &tls.Config{RootCAs: rootPool(d)})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cached, served) {
		t.Errorf("cached document\n%+v\ndiffers from the served one\n%+v", cached, served)
	}
	if q, ok := served.Find(wire.DiscoverQUIC); !ok || q.Addr() != dl.Server {
		t.Errorf("the document's quic transport %+v does not say %s", q, dl.Server)
	}

	var hits atomic.Int32
	counter := httptest.NewTLSServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	defer counter.Close()
	later, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	defer later.Close()
	later.Cache, later.DiscoveryURL = dl.Cache, counter.URL+wire.DiscoveryPath
	pingThrough(t, later, echo)
	if hits.Load() != 0 {
		t.Errorf("a later Dialer fetched the document again (%d requests) although the cache had it", hits.Load())
	}
}
