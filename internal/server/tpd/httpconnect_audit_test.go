package tpd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/policy"
)

// With the default policy (internal addresses closed) and a rule that allows
// every dial, a CONNECT to a loopback echo is refused exactly as a tp dial is
// (403, the internal-address reason in the body and Proxy-Status), until
// allowed_internal opens the address; then both reach it. The bad input: a
// CONNECT to 127.0.0.1, an internal address the policy does not open.
func TestConnectInternalAddressLikeDial(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, policy.DefaultPolicy+"\nallow if input.action == \"dial\"\n")
	echo := testnet.Echo(t)
	dl, err := r.alice.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dl.Close() })
	_, dialErr := dl.DialContext(context.Background(), "tcp", echo)
	if !errors.Is(dialErr, authz.ErrPolicyDenied) || !strings.Contains(dialErr.Error(), "internal address") {
		t.Fatalf("tp dial to loopback: %v; want the internal-address denial", dialErr)
	}
	resp, _, _ := r.connectH1(t, echo)
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != 403 || !strings.Contains(string(body), "internal address") ||
		!strings.Contains(resp.Header.Get("Proxy-Status"), "error=http_request_denied") ||
		!strings.Contains(resp.Header.Get("Proxy-Status"), "internal address") {
		t.Fatalf("CONNECT to loopback: %d %q, Proxy-Status %q; want 403 with the internal-address reason", resp.StatusCode, body, resp.Header.Get("Proxy-Status"))
	}
	if err := os.WriteFile(filepath.Join(r.d.cfg.PolicyDir(), "open.rego"), []byte("package tp.authz\n\nallowed_internal contains \"127.0.0.1/32\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.d.ReloadPolicy(context.Background()); err != nil {
		t.Fatal(err)
	}
	resp, c, br := r.connectH1(t, echo)
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT after allowed_internal: %d", resp.StatusCode)
	}
	c.Write([]byte("opened"))
	c.CloseWrite()
	if got, err := io.ReadAll(br); err != nil || string(got) != "opened" {
		t.Fatalf("through the opened tunnel: %q, %v", got, err)
	}
	if c, err := dl.DialContext(context.Background(), "tcp", echo); err != nil {
		t.Fatalf("tp dial after allowed_internal: %v", err)
	} else {
		c.Close()
	}
}

// curl (Debian's) without a device certificate is refused at the proxy
// name's handshake (the bad input: no --proxy-cert), and curl -v shows that
// the proxy name asks for a certificate while tpd's website on the same port
// does not (no "Request CERT" in its handshake), so a browser is never
// prompted there.
func TestConnectCurlNoCertificate(t *testing.T) {
	t.Parallel()
	needTool(t, "curl", "curl")
	r := newConnectRig(t, allowAlice)
	srv, srvPEM := httpsServer(t, "unreachable without a certificate")
	cmd := exec.Command("curl", "--silent", "--show-error", "--max-time", "60",
		"--proxy", "https://"+proxyName+":"+r.port, "--resolve", proxyName+":"+r.port+":127.0.0.1",
		"--proxy-cacert", r.rootF, "--cacert", srvPEM, srv.URL+"/")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("curl without a device certificate went through the proxy name:\n%s", out)
	}
	t.Logf("curl without a certificate: %s", strings.TrimSpace(string(out)))
	// curl sends its CONNECT right behind its Finished, so the server's
	// certificate_required alert can be overtaken by the reset of the closed
	// connection (the unread CONNECT makes the kernel send RST): either is the
	// handshake's refusal, never an HTTP answer.
	if s := string(out); !strings.Contains(s, "certificate required") && !strings.Contains(s, "reset") {
		t.Errorf("curl without a certificate failed, but not on the proxy's certificate_required alert:\n%s", out)
	}

	// The website's name on the same port: no CertificateRequest.
	web := exec.Command("curl", "-v", "--silent", "--show-error", "--max-time", "60",
		"--resolve", "localhost:"+r.port+":127.0.0.1", "--cacert", r.rootF, "https://localhost:"+r.port+"/")
	out, err = web.CombinedOutput()
	if err != nil {
		t.Fatalf("curl to the website on the same port: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "Request CERT") {
		t.Fatalf("the website asked curl for a client certificate:\n%s", out)
	}
	// The control: the same verbose output shows the proxy name asking.
	_, stderr, err := r.curl(t, nil, "-v", "--cacert", srvPEM, srv.URL+"/")
	if err != nil {
		t.Fatalf("curl through the proxy with the certificate: %v\n%s", err, stderr)
	}
	if !strings.Contains(stderr, "Request CERT") {
		t.Fatalf("curl -v does not show the proxy name's CertificateRequest, so the website check above proves nothing:\n%s", stderr)
	}
}

// streamConn makes a CONNECT tunnel's reader and writer a net.Conn for TLS.
type streamConn struct {
	io.Reader
	io.Writer
	closer func() error
}

func (c *streamConn) Close() error                     { return c.closer() }
func (c *streamConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *streamConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

// HTTP/2 CONNECT (Go's h2 client) and HTTP/3 CONNECT (quic-go's client) reach a
// real HTTPS server: TLS to the destination runs inside the tunnel, end to end,
// and an HTTP request over it gets the page. (Debian's curl 7.88 has no
// --proxy-http2, docs/HTTP.md §1.2; these are the h2 and h3 proxy clients.)
func TestConnectHTTP2AndHTTP3ToHTTPS(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, allowAlice)
	srv, _ := httpsServer(t, "hello over a tunnel")
	pool := r.roots.Clone()
	pool.AddCert(srv.Certificate())
	target := strings.TrimPrefix(srv.URL, "https://")
	get := func(t *testing.T, tunnel net.Conn) {
		t.Helper()
		tc := tls.Client(tunnel, &tls.Config{ServerName: "127.0.0.1", RootCAs: pool, NextProtos: []string{"http/1.1"}})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := tc.HandshakeContext(ctx); err != nil {
			t.Fatalf("TLS to the destination inside the tunnel: %v", err)
		}
		defer tc.Close()
		if _, err := io.WriteString(tc, "GET / HTTP/1.1\r\nHost: "+target+"\r\nConnection: close\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 || string(b) != "hello over a tunnel" {
			t.Fatalf("GET through the tunnel: %d %q %v", resp.StatusCode, b, err)
		}
	}
	t.Run("h2", func(t *testing.T) {
		pr, pw := io.Pipe()
		resp := r.h2Connect(t, target, pr)
		if resp.StatusCode != 200 {
			t.Fatalf("h2 CONNECT: %d", resp.StatusCode)
		}
		get(t, &streamConn{Reader: resp.Body, Writer: pw, closer: pw.Close})
	})
	t.Run("h3", func(t *testing.T) {
		str, resp := r.h3Connect(t, target)
		if resp.StatusCode != 200 {
			t.Fatalf("h3 CONNECT: %d", resp.StatusCode)
		}
		get(t, &streamConn{Reader: str, Writer: str, closer: str.Close})
	})
	// A refused h3 CONNECT carries the policy's reason in the body too.
	r2 := newConnectRig(t, connectPolicy)
	_, resp := r2.h3Connect(t, "127.0.0.1:9")
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != 403 || !strings.Contains(string(b), "port 9 is closed") {
		t.Fatalf("denied h3 CONNECT: %d %q; want 403 with the policy's reason in the body", resp.StatusCode, b)
	}
}

// h2 and h3 CONNECT tunnels are the same sessions as tp dials too: each has an
// audit record with action dial, the device's identity, the destination, and
// the transport the policy saw (tls for h2, quic for h3).
func TestConnectH2H3AuditLikeDial(t *testing.T) {
	t.Parallel()
	auditPath := filepath.Join(t.TempDir(), "audit.jsonl")
	r := newConnectRig(t, allowAlice, func(c *config.Server) { c.AuditLog = auditPath })
	for _, tc := range []struct{ version, transport string }{{"h2", "tls"}, {"h3", "quic"}} {
		echo := testnet.Echo(t)
		var got []byte
		var err error
		if tc.version == "h2" {
			resp := r.h2Connect(t, echo, strings.NewReader("audited"))
			got, err = io.ReadAll(resp.Body)
		} else {
			str, resp := r.h3Connect(t, echo)
			if resp.StatusCode != 200 {
				t.Fatalf("h3 CONNECT: %d", resp.StatusCode)
			}
			_, _ = str.Write([]byte("audited"))
			_ = str.Close()
			_ = str.SetReadDeadline(time.Now().Add(30 * time.Second))
			got, err = io.ReadAll(str)
		}
		if err != nil || string(got) != "audited" {
			t.Fatalf("%s CONNECT echo: %q, %v", tc.version, got, err)
		}
		waitAudit(t, auditPath, "the "+tc.version+" tunnel's audit record", func(m map[string]any) bool {
			return m["action"] == "dial" && m["identity"] == "alice@laptop" && m["transport"] == tc.transport &&
				m["destination"] == echo && m["decision"] == "allow"
		})
	}
}
