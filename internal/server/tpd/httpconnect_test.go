package tpd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testdns"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/net/http2"
)

// proxyName is the default proxy-names entry; tpd's certificate covers it.
const proxyName = "proxy.localhost"

// connectPolicy allows alice everywhere but to deniedPort, with a reason.
const connectPolicy = `package tp.authz

default allow := false

allow if {
	input.identity.user == "alice"
	input.destination.port != 9
}

reason := "port 9 is closed to every device by the CONNECT test policy" if not allow
`

// connectRig is a real tpd (real CA, real OPA) with an enrolled device whose
// certificate, key and TP's root are in PEM files, as curl wants them.
type connectRig struct {
	d                        *Daemon
	alice                    *clients.Client
	addr                     string // the public port, TCP and UDP
	port                     string
	cert                     tls.Certificate
	roots                    *x509.CertPool
	certFile, keyFile, rootF string
}

func newConnectRig(t testing.TB, policy string, mods ...func(*config.Server)) *connectRig {
	t.Helper()
	d := connectDaemon(t, policy, mods...)
	u := d.cfg.PublicURL()
	alice, _, _ := enrollClient(t, d, u, "alice", "laptop")
	cert, err := alice.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	r := &connectRig{d: d, alice: alice, addr: d.cfg.Listen, cert: *cert, roots: rootPool(d)}
	_, r.port, _ = net.SplitHostPort(r.addr)
	dir := t.TempDir()
	var chain bytes.Buffer
	for _, der := range cert.Certificate {
		_ = pem.Encode(&chain, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	r.certFile, r.keyFile, r.rootF = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "root.pem")
	writePEM(t, r.certFile, chain.Bytes())
	writePEM(t, r.keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
	writePEM(t, r.rootF, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d.pki.Root.Raw}))
	return r
}

// connectDaemon is serveDaemon with a real DNS server of the test's as the
// resolver for destination names (it answers NXDOMAIN for every name), and the
// daemon's log in a buffer.
func connectDaemon(t testing.TB, policy string, mods ...func(*config.Server)) *Daemon {
	t.Helper()
	cfg := config.DefaultServer()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.PolicyTimeout = 5 * time.Second // -race is slow; the bound is not what is tested here
	for _, mod := range mods {
		mod(&cfg)
	}
	if _, err := Init(cfg); err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(policy))
	ln, err := Listen("127.0.0.1:0", true) // a port free on UDP too, for QUIC
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = ln.Addr().String()
	d, err := New(context.Background(), cfg, nil, WithResolver(testdns.Start(t).Resolver()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		err, ended := waitEnd(t, "the daemon's Serve", done, daemonStopBound(cfg.ShutdownTimeout))
		if !ended {
			return // Serve still runs: closing under it would only add noise
		}
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
		d.Close()
	})
	return d
}

func writePEM(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// curl runs Debian's curl through the proxy name with the device certificate.
func (r *connectRig) curl(t *testing.T, stdin io.Reader, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	needTool(t, "curl", "curl")
	base := []string{"--silent", "--show-error", "--max-time", "60",
		"--proxy", "https://" + proxyName + ":" + r.port,
		"--resolve", proxyName + ":" + r.port + ":127.0.0.1",
		"--proxy-cert", r.certFile, "--proxy-key", r.keyFile, "--proxy-cacert", r.rootF}
	cmd := exec.Command("curl", append(base, args...)...)
	cmd.Stdin = stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	return out.String(), errb.String(), err
}

// tlsConfig is the device's TLS configuration for the proxy name.
func (r *connectRig) tlsConfig(protos ...string) *tls.Config {
	return &tls.Config{ServerName: proxyName, RootCAs: r.roots, Certificates: []tls.Certificate{r.cert}, NextProtos: protos}
}

// httpsServer is a real local HTTPS server and the PEM file of its certificate.
func httpsServer(t *testing.T, body string) (*httptest.Server, string) {
	t.Helper()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	f := filepath.Join(t.TempDir(), "srv.pem")
	writePEM(t, f, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}))
	return srv, f
}

// checksumServer reads n bytes, answers with their SHA-256 in hex and a
// newline, and closes.
func checksumServer(t *testing.T, n int) string {
	t.Helper()
	return testnet.Serve(t, func(c *net.TCPConn) {
		h := sha256.New()
		if _, err := io.CopyN(h, c, int64(n)); err != nil {
			return
		}
		fmt.Fprintf(c, "%x\n", h.Sum(nil))
	})
}

// randomText is n random bytes from the hex alphabet (no byte a telnet client
// would escape).
func randomText(n int) []byte {
	b := make([]byte, (n+1)/2)
	_, _ = rand.Read(b)
	return []byte(hex.EncodeToString(b)[:n])
}

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// curl through HTTP/1.1 CONNECT on the proxy name reaches a real HTTPS server.
func TestConnectCurlHTTPS(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	srv, srvPEM := httpsServer(t, "hello through TP's CONNECT")
	out, stderr, err := r.curl(t, nil, "--cacert", srvPEM, srv.URL+"/")
	if err != nil {
		t.Fatalf("curl: %v\n%s", err, stderr)
	}
	if out != "hello through TP's CONNECT" {
		t.Fatalf("curl got %q", out)
	}
}

// curl -p (a plain TCP tunnel: telnet://) carries bytes both ways: the
// destination's checksum of what curl sent comes back.
func TestConnectCurlTCPChecksum(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	data := randomText(200_000)
	dest := checksumServer(t, len(data))
	out, stderr, err := r.curl(t, bytes.NewReader(data), "-p", "telnet://"+dest)
	if err != nil {
		t.Fatalf("curl: %v\n%s", err, stderr)
	}
	if strings.TrimSpace(out) != sum(data) {
		t.Fatalf("the destination's checksum %q is not that of what curl sent (%s)", out, sum(data))
	}
}

// A destination the policy denies gets 403 with the policy's reason in
// Proxy-Status (curl shows the CONNECT response with -v).
func TestConnectCurlDenied(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	_, stderr, err := r.curl(t, nil, "-v", "-p", "http://127.0.0.1:9/")
	if err == nil {
		t.Fatal("curl reached port 9, which the policy denies")
	}
	for _, want := range []string{
		"< HTTP/1.1 403",
		`< Proxy-Status: proxy.localhost; error=http_request_denied; details="port 9 is closed to every device by the CONNECT test policy"`,
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("curl -v shows no %q:\n%s", want, stderr)
		}
	}
}

// connectH1 sends one HTTP/1.1 CONNECT for target on a fresh TLS connection to
// the proxy name and returns the response and the connection.
func (r *connectRig) connectH1(t testing.TB, target string) (*http.Response, *tls.Conn, *bufio.Reader) {
	t.Helper()
	c, err := tls.Dial("tcp", r.addr, r.tlsConfig("http/1.1"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatal(err)
	}
	return resp, c, br
}

// Each refusal is an HTTP status with a Proxy-Status error type from RFC 9209
// and a reason in the body.
func TestConnectRefusals(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	closed := net.JoinHostPort("127.0.0.1", strconv.Itoa(testnet.FreePort(t, "tcp")))
	for _, tc := range []struct {
		target, why string
		status      int
		perr, body  string
	}{
		{"127.0.0.1:9", "a port the policy denies", 403, "http_request_denied", "port 9 is closed"},
		{closed, "a port nothing listens on", 502, "connection_refused", "refused"},
		{"127.0.0.1:" + r.port, "tpd itself", 403, "destination_ip_prohibited", "this TP server itself"},
		{"no-port.example", "no port", 400, "http_request_error", "host:port"},
		{"example.org:99999", "a port out of range", 400, "http_request_error", "no valid port"},
		{"nx.test:443", "a name that does not resolve", 502, "dns_error", "cannot resolve"},
	} {
		resp, _, _ := r.connectH1(t, tc.target)
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		ps := resp.Header.Get("Proxy-Status")
		if resp.StatusCode != tc.status || !strings.HasPrefix(ps, proxyName+"; error="+tc.perr+"; details=") || !strings.Contains(string(body), tc.body) {
			t.Errorf("CONNECT %s (%s): %d, Proxy-Status %q, body %q; want %d, error=%s, a body saying %q",
				tc.target, tc.why, resp.StatusCode, ps, body, tc.status, tc.perr, tc.body)
		}
	}
}

// A client without a certificate is refused at the handshake on the proxy
// name, while the website on the same port completes a handshake and never
// asks for one.
func TestConnectCertOnlyOnProxyName(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	// The proxy name, no certificate (bad input): the handshake fails.
	c, err := tls.Dial("tcp", r.addr, &tls.Config{ServerName: proxyName, RootCAs: r.roots, NextProtos: []string{"h2", "http/1.1"}})
	if err == nil {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1)) // TLS 1.3: the server's alert follows the client's Finished
		c.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "certificate required") {
		t.Fatalf("the proxy name accepted a client without a certificate: %v", err)
	}
	// The website's name on the same port, as a browser: no certificate request.
	for _, proto := range [][]string{{"h2", "http/1.1"}, nil} {
		asked := false
		wc, err := tls.Dial("tcp", r.addr, &tls.Config{ServerName: "localhost", RootCAs: r.roots, NextProtos: proto,
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				asked = true
				return &tls.Certificate{}, nil
			}})
		if err != nil {
			t.Fatalf("the website's handshake failed: %v", err)
		}
		_ = wc.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(wc, "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
		if wc.ConnectionState().NegotiatedProtocol == "h2" {
			wc.Close()
		} else if resp, err := http.ReadResponse(bufio.NewReader(wc), nil); err != nil || resp.StatusCode != 200 {
			t.Errorf("the website did not answer: %v", err)
		}
		wc.Close()
		if asked {
			t.Fatalf("the website (ALPN %q) sent a CertificateRequest: a browser would be prompted", proto)
		}
	}
	// The same over QUIC: h3 to the proxy name without a certificate fails,
	// h3 to the website completes without being asked.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, r.addr, &tls.Config{ServerName: proxyName, RootCAs: r.roots, NextProtos: []string{http3.NextProtoH3}}, nil)
	if err == nil {
		_, err = qc.AcceptStream(ctx) // the server's refusal follows the client's Finished
		qc.CloseWithError(0, "")
	}
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("h3 to the proxy name without a certificate: %v", err)
	}
	asked := false
	qc, err = quic.DialAddr(ctx, r.addr, &tls.Config{ServerName: "localhost", RootCAs: r.roots, NextProtos: []string{http3.NextProtoH3},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			asked = true
			return &tls.Certificate{}, nil
		}}, nil)
	if err != nil {
		t.Fatalf("h3 to the website: %v", err)
	}
	qc.CloseWithError(0, "")
	if asked {
		t.Fatal("the website over h3 sent a CertificateRequest")
	}
}

// Go's net/http client with Proxy set (an https proxy; the device certificate
// in TLSClientConfig) reaches a real HTTPS server.
func TestConnectGoNetHTTP(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	srv, _ := httpsServer(t, "hello, net/http")
	pool := r.roots.Clone()
	pool.AddCert(srv.Certificate())
	proxyURL, _ := url.Parse("https://" + proxyName + ":" + r.port)
	tr := &http.Transport{
		Proxy:           http.ProxyURL(proxyURL),
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{r.cert}},
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if addr == proxyName+":"+r.port {
				addr = r.addr
			}
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
	}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "hello, net/http" {
		t.Fatalf("got %q", b)
	}
}

// h2Connect opens an HTTP/2 CONNECT (RFC 9113 §8.5) to target with
// golang.org/x/net/http2 over a TLS connection that carries the device
// certificate; the request body is what the client sends.
func (r *connectRig) h2Connect(t testing.TB, target string, body io.Reader) *http.Response {
	t.Helper()
	c, err := tls.Dial("tcp", r.addr, r.tlsConfig("h2"))
	if err != nil {
		t.Fatal(err)
	}
	if c.ConnectionState().NegotiatedProtocol != "h2" {
		t.Fatalf("the proxy name negotiated %q, not h2", c.ConnectionState().NegotiatedProtocol)
	}
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: target}, Host: target, Header: http.Header{}, Body: io.NopCloser(body)}
	resp, err := cc.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// HTTP/2 CONNECT carries a TCP echo both ways; the client's END_STREAM
// half-closes the destination, whose reply then still arrives in full.
func TestConnectHTTP2Echo(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	data := randomText(1 << 20)
	resp := r.h2Connect(t, testnet.Echo(t), bytes.NewReader(data))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the tunnel: %v", err)
	}
	if sum(got) != sum(data) {
		t.Fatalf("echo of %d bytes came back as %d bytes with another checksum", len(data), len(got))
	}
	// A denied destination over h2: 403, Proxy-Status, the reason in the body.
	resp = r.h2Connect(t, "127.0.0.1:9", http.NoBody)
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 403 || !strings.Contains(resp.Header.Get("Proxy-Status"), "error=http_request_denied") || !strings.Contains(string(b), "port 9 is closed") {
		t.Fatalf("denied h2 CONNECT: %d %q %q", resp.StatusCode, resp.Header.Get("Proxy-Status"), b)
	}
}

// h3Connect opens an HTTP/3 CONNECT (RFC 9114 §4.4) to target with quic-go's
// HTTP/3 client.
func (r *connectRig) h3Connect(t testing.TB, target string) (*http3.RequestStream, *http.Response) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, r.addr, r.tlsConfig(http3.NextProtoH3), &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qc.CloseWithError(0, "") })
	cc := (&http3.Transport{}).NewRawClientConn(qc)
	str, err := cc.OpenRequestStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: target}, Host: target, Header: http.Header{}}
	if err := str.SendRequestHeader(req); err != nil {
		t.Fatal(err)
	}
	resp, err := str.ReadResponse()
	if err != nil {
		t.Fatal(err)
	}
	return str, resp
}

// HTTP/3 CONNECT carries a TCP echo both ways, half-closed by the client's FIN.
func TestConnectHTTP3Echo(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	data := randomText(1 << 20)
	str, resp := r.h3Connect(t, testnet.Echo(t))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	go func() {
		_, _ = str.Write(data)
		_ = str.Close() // FIN: the client's direction ends
	}()
	_ = str.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(str)
	if err != nil {
		t.Fatalf("reading the tunnel: %v", err)
	}
	if sum(got) != sum(data) {
		t.Fatalf("echo of %d bytes came back as %d bytes with another checksum", len(data), len(got))
	}
	_, resp = r.h3Connect(t, "127.0.0.1:9")
	if resp.StatusCode != 403 || !strings.Contains(resp.Header.Get("Proxy-Status"), "port 9 is closed") {
		t.Fatalf("denied h3 CONNECT: %d %q", resp.StatusCode, resp.Header.Get("Proxy-Status"))
	}
}

// resetAfter is a destination that sends prefix and then resets the connection.
func resetAfter(t *testing.T, prefix string) string {
	t.Helper()
	return testnet.Serve(t, func(c *net.TCPConn) {
		_, _ = c.Write([]byte(prefix))
		_, _ = c.Read(make([]byte, 1)) // the client's byte: the tunnel is up at both ends
		_ = c.SetLinger(0)
		_ = c.Close()
	})
}

// A destination that resets its connection reaches the client as an abort on
// every protocol (a TCP reset, RST_STREAM, an h3 stream reset), never as a
// clean end that would pass a cut transfer for a complete one.
func TestConnectAbortReachesClient(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	dest := resetAfter(t, "partial")
	// readAbort reads what the destination sent before its reset, then sends
	// the byte that makes it reset (bad input: a destination that resets its
	// connection mid-tunnel), then reads on to the end. The bytes are read
	// first because a reset may discard what is still in flight on any of
	// these transports: the test is about how the end arrives.
	readAbort := func(t *testing.T, rd io.Reader, w io.Writer) error {
		t.Helper()
		b := make([]byte, len("partial"))
		if _, err := io.ReadFull(rd, b); err != nil || string(b) != "partial" {
			t.Fatalf("the destination's first bytes through the tunnel: %q, %v", b, err)
		}
		if _, err := w.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		_, err := io.ReadAll(rd)
		return err
	}
	t.Run("http1", func(t *testing.T) {
		resp, c, br := r.connectH1(t, dest)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		if err := readAbort(t, br, c); err == nil {
			t.Fatal("the destination's reset reached the HTTP/1.1 client as a clean end")
		}
	})
	t.Run("h2", func(t *testing.T) {
		pr, pw := io.Pipe()
		defer pw.Close()
		resp := r.h2Connect(t, dest, pr)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		err := readAbort(t, resp.Body, pw)
		var se http2.StreamError
		if !errors.As(err, &se) || se.Code != http2.ErrCodeInternal {
			t.Fatalf("the destination's reset reached the h2 client as %v, not RST_STREAM(INTERNAL_ERROR)", err)
		}
	})
	t.Run("h3", func(t *testing.T) {
		str, resp := r.h3Connect(t, dest)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		_ = str.SetReadDeadline(time.Now().Add(30 * time.Second))
		err := readAbort(t, str, str)
		var se *quic.StreamError
		if !errors.As(err, &se) || se.ErrorCode != quic.StreamErrorCode(http3.ErrCodeConnectError) {
			t.Fatalf("the destination's reset reached the h3 client as %v, not a reset with H3_CONNECT_ERROR", err)
		}
	})
}

// An HTTP/1.1 tunnel is the same session as a tp dial: the audit trail records
// it (action dial, the device's identity), the client's close_notify
// half-closes the destination while its reply still arrives, and a policy
// change that no longer allows it cuts it with a reset.
func TestConnectSessionLikeDial(t *testing.T) {
	t.Parallel()
	auditPath := filepath.Join(t.TempDir(), "audit.jsonl")
	r := newConnectRig(t, allowAlice, func(c *config.Server) { c.AuditLog = auditPath })
	upper := testnet.Upper(t)
	resp, c, br := r.connectH1(t, upper)
	if resp.StatusCode != 200 || resp.Header.Get("TP-Session") == "" {
		t.Fatalf("status %d, TP-Session %q", resp.StatusCode, resp.Header.Get("TP-Session"))
	}
	c.Write([]byte("half-closed"))
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(br)
	if err != nil || string(got) != "HALF-CLOSED" {
		t.Fatalf("after the client's half-close: %q, %v; want the reply and a clean end", got, err)
	}
	waitAudit(t, auditPath, "the tunnel's audit record", func(m map[string]any) bool {
		return m["action"] == "dial" && m["identity"] == "alice@laptop" && m["transport"] == "tls" &&
			m["destination"] == upper && m["decision"] == "allow" && m["end_code"] == "closed"
	})

	echo := testnet.Echo(t)
	resp, c, br = r.connectH1(t, echo)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	c.Write([]byte("x"))
	if _, err := io.ReadFull(br, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(r.d.cfg.PolicyDir(), "tp.rego"), []byte(`package tp.authz

default allow := false

reason := "alice's tunnels ended with this policy" if not allow
`))
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err = io.ReadAll(br)
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("after a policy change that denies it, the tunnel ended with %v; want a reset", err)
	}
	waitAudit(t, auditPath, "the cut tunnel's audit record", func(m map[string]any) bool {
		return m["destination"] == echo && m["end_code"] == "policy_changed"
	})
}

// A device at its bound of sessions (max-sessions-per-identity) gets 429.
func TestConnectSessionBound(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice, func(c *config.Server) { c.MaxSessionsPerIdentity = 1 })
	echo := testnet.Echo(t)
	if resp, _, _ := r.connectH1(t, echo); resp.StatusCode != 200 {
		t.Fatalf("first tunnel: %d", resp.StatusCode)
	}
	resp, _, _ := r.connectH1(t, echo) // bad input: a second session over the bound of 1
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(resp.Header.Get("Proxy-Status"), "error=connection_limit_reached") {
		t.Fatalf("second tunnel over the bound: %d, Proxy-Status %q", resp.StatusCode, resp.Header.Get("Proxy-Status"))
	}
}

// A client that resets its h2 stream resets the destination's connection too.
func TestConnectClientAbortReachesDestination(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	dest, conns := testnet.Accept(t)
	pr, pw := io.Pipe()
	resp := r.h2Connect(t, dest, pr)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	pw.Write([]byte("x"))
	up := nextConn(t, conns)
	if _, err := io.ReadFull(up, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	pw.CloseWithError(errors.New("the client gives up")) // the h2 client resets the stream
	wantReset(t, "destination", up)
}

// A request on the proxy name that is not CONNECT goes to tpd's ProxyHTTP
// handler (404 with a hint); a reverse-tunnel request is routed apart.
func TestConnectOtherRequests(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	tr := &http.Transport{TLSClientConfig: r.tlsConfig(), ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, r.addr)
		}}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	resp, err := hc.Get("https://" + proxyName + ":" + r.port + "/")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 404 || !strings.Contains(string(b), "CONNECT") || resp.ProtoMajor != 2 {
		t.Fatalf("GET / on the proxy name: %s %d %q", resp.Proto, resp.StatusCode, b)
	}
	req, _ := http.NewRequest(http.MethodGet, "https://"+proxyName+":"+r.port+"/tunnel", nil)
	req.Header.Set("Upgrade", "reverse")
	req.Header.Set("Connection", "Upgrade")
	tr1 := &http.Transport{TLSClientConfig: r.tlsConfig("http/1.1"), DialContext: tr.DialContext}
	defer tr1.CloseIdleConnections()
	resp, err = (&http.Client{Transport: tr1, Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if strings.Contains(string(b), "HTTPS proxy name") {
		t.Fatalf("Upgrade: reverse reached the ProxyHTTP handler, not the reverse tunnels (%d %q)", resp.StatusCode, b)
	}
	// The discovery document answers on the proxy name too, naming it for CONNECT.
	resp, err = hc.Get("https://" + proxyName + ":" + r.port + "/.well-known/tp")
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"https://`+proxyName+":"+r.port+`"`) {
		t.Fatalf("discovery on the proxy name: %d %s", resp.StatusCode, b)
	}
}

// A public reverse name is reached like any destination. A protected one's
// agent speaks only TP's end-to-end TLS: CONNECT refuses it with a sentence
// saying so, rather than relaying bytes the agent would reject. The bad input:
// CONNECT svc.rev.tp.internal:22 while alice's agent serves svc in protected
// mode.
func TestConnectReverseNames(t *testing.T) {
	t.Parallel()
	port := testnet.FreePort(t, "tcp")
	r := newConnectRig(t, allowAlice, func(c *config.Server) { c.PublicPorts = strconv.Itoa(port) })
	if _, err := runAgent(t, r.alice, clients.TransportTLS, []clients.Exposed{
		{Name: "svc", Local: testnet.Echo(t)},
		{Name: "game", Local: testnet.Upper(t), PublicPort: port},
	}, nil); err != nil {
		t.Fatal(err)
	}
	resp, c, br := r.connectH1(t, "game."+r.d.cfg.ReverseZone+":7")
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT to a public reverse name: %d", resp.StatusCode)
	}
	c.Write([]byte("via agent"))
	c.CloseWrite()
	if got, err := io.ReadAll(br); err != nil || string(got) != "VIA AGENT" {
		t.Fatalf("through the public reverse name: %q, %v", got, err)
	}

	resp, _, _ = r.connectH1(t, "svc."+r.d.cfg.ReverseZone+":22")
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != 403 || !strings.Contains(string(body), "protected reverse name") {
		t.Fatalf("CONNECT to a protected reverse name: %d %q", resp.StatusCode, body)
	}
}

// On h2 a destination that finishes sending first (here: it says bye and
// closes while the client's direction is still open) gives the client the
// whole reply and a clean END_STREAM; the client is asked to stop sending
// (docs/HTTP.md, section 4). On h3 the client's direction stays open.
func TestConnectDestinationEndsFirst(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	dest := testnet.Serve(t, func(c *net.TCPConn) {
		_, _ = c.Read(make([]byte, 1))
		_, _ = c.Write([]byte("bye"))
		_ = c.CloseWrite()
		_, _ = io.Copy(io.Discard, c)
	})
	t.Run("h2", func(t *testing.T) {
		pr, pw := io.Pipe()
		defer pw.Close() // the client never ends its direction itself
		resp := r.h2Connect(t, dest, pr)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		go pw.Write([]byte("x"))
		got, err := io.ReadAll(resp.Body)
		if err != nil || string(got) != "bye" {
			t.Fatalf("the destination's complete reply reached the h2 client as %q, %v; want \"bye\" and a clean end", got, err)
		}
	})
	t.Run("h3", func(t *testing.T) {
		str, resp := r.h3Connect(t, dest)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		str.Write([]byte("x"))
		_ = str.SetReadDeadline(time.Now().Add(30 * time.Second))
		got, err := io.ReadAll(str)
		if err != nil || string(got) != "bye" {
			t.Fatalf("h3 client got %q, %v; want \"bye\" and a clean end", got, err)
		}
		if _, err := str.Write([]byte("still sending")); err != nil {
			t.Fatalf("after the destination's FIN the h3 client's direction was closed: %v", err)
		}
	})
}

// An agent cannot take a proxy name for SNI pass-through (bad input: tp
// expose --public-sni proxy.localhost): CONNECT clients' handshakes must keep
// reaching tpd.
func TestConnectProxyNameNotPassedThrough(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	_, err := runAgent(t, r.alice, clients.TransportTLS, []clients.Exposed{{Name: "blog", Local: testnet.Echo(t), PublicSNI: proxyName,
		TLS: &tls.Config{Certificates: []tls.Certificate{r.cert}}}}, nil)
	wantRefused(t, err, wire.CodePublicRefused, "proxy names")
	if resp, _, _ := r.connectH1(t, testnet.Echo(t)); resp.StatusCode != 200 {
		t.Fatalf("CONNECT after the attempt: %d", resp.StatusCode)
	}
}

// The proxy name's router hands a reverse tunnel (tp expose --http's
// HTTP/1.1 Upgrade) to the reverse-tunnel server, and the name it holds is
// then served to a browser-style client (no certificate) on the same port.
func TestConnectRouterServesReverseHTTP(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		io.WriteString(w, "app says hi to "+req.Host)
	}))
	t.Cleanup(app.Close)
	local, _ := url.Parse(app.URL)
	up := make(chan string, 4)
	x := &clients.HTTPExposer{Server: r.addr, ProxyName: proxyName, Name: "blog", Local: local, Tunnels: 1, ExitOnRefusal: true,
		TLSConfig: &tls.Config{RootCAs: r.roots, Certificates: []tls.Certificate{r.cert}},
		Established: func(sel string) {
			select {
			case up <- sel:
			default:
			}
		}}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- x.Run(ctx) }()
	t.Cleanup(func() { cancel(); waitEnd(t, "tp expose --http", errc, stopBound) })
	select {
	case <-up:
	case err := <-errc:
		t.Fatalf("tp expose --http through the proxy name: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no reverse tunnel within 30s")
	}
	name := "blog." + r.d.cfg.ReverseZone
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: r.roots},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, r.addr)
		}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Get("https://" + name + ":" + r.port + "/")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(string(b), "app says hi") {
		t.Fatalf("GET https://%s/: %d %q", name, resp.StatusCode, b)
	}
}
