package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
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
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// draftStream is a reverse tunnel's byte stream after success, as a net.Conn
// (deadlines are not carried: the test bounds itself).
type draftStream struct {
	io.Reader
	io.Writer
	closer        func() error
	local, remote net.Addr
}

func (c *draftStream) Close() error                     { return c.closer() }
func (c *draftStream) LocalAddr() net.Addr              { return c.local }
func (c *draftStream) RemoteAddr() net.Addr             { return c.remote }
func (c *draftStream) SetDeadline(time.Time) error      { return nil }
func (c *draftStream) SetReadDeadline(time.Time) error  { return nil }
func (c *draftStream) SetWriteDeadline(time.Time) error { return nil }

// draftReverse is a reverse-tunnel client written from the text of
// draft-kazuho-httpbis-reverse-tunnel alone: TLS to the proxy with the device
// certificate dlogin left in home (the draft's TLS client authentication),
// then the tunnel request for /.well-known/tp/reverse-http/LABEL (TP's tunnel
// URI for an HTTP app, which the draft leaves to the deployment) with an ALPN
// field, over HTTP/1.1 (GET, Connection: upgrade, Upgrade: reverse; success
// 101) or h2 (extended CONNECT, :protocol reverse; success 200). It returns
// the protocol the proxy selected and the tunnel, on which the roles are now
// reversed.
func draftReverse(addr string, root *x509.CertPool, home, version, label, alpn string) (selected string, tun net.Conn, err error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(home, "cert.pem"), filepath.Join(home, "key.pem"))
	if err != nil {
		return "", nil, err
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, &tls.Config{
		ServerName: "proxy.localhost", RootCAs: root, Certificates: []tls.Certificate{cert},
		NextProtos: []string{version}, MinVersion: tls.VersionTLS13,
	})
	if err != nil {
		return "", nil, err
	}
	path := "/.well-known/tp/reverse-http/" + label
	if version == "http/1.1" {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		req := "GET " + path + " HTTP/1.1\r\nHost: proxy.localhost\r\nConnection: upgrade\r\nUpgrade: reverse\r\nALPN: " + alpn + "\r\n\r\n"
		if _, err := io.WriteString(c, req); err != nil {
			c.Close()
			return "", nil, err
		}
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			c.Close()
			return "", nil, err
		}
		if resp.StatusCode != http.StatusSwitchingProtocols || !strings.EqualFold(resp.Header.Get("Upgrade"), "reverse") {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			c.Close()
			return "", nil, fmt.Errorf("tunnel request: %s, Upgrade %q: %s", resp.Status, resp.Header.Get("Upgrade"), b)
		}
		c.SetDeadline(time.Time{})
		return resp.Header.Get("Selected-ALPN"), &draftStream{Reader: br, Writer: c, closer: c.Close,
			local: c.LocalAddr(), remote: c.RemoteAddr()}, nil
	}
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		c.Close()
		return "", nil, err
	}
	pr, pw := io.Pipe()
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Scheme: "https", Host: "proxy.localhost", Path: path},
		Host: "proxy.localhost", Header: http.Header{":protocol": {"reverse"}, "Alpn": {alpn}}, Body: pr, ContentLength: -1}
	// The request's context is the stream's for its whole life (x/net/http2
	// resets the stream when it ends), so only the set-up is timed.
	ctx, cancel := context.WithCancel(context.Background())
	setup := time.AfterFunc(30*time.Second, cancel)
	resp, err := cc.RoundTrip(req.WithContext(ctx))
	if err != nil || !setup.Stop() {
		cancel()
		cc.Close()
		if err == nil {
			err = errors.New("no answer to the extended CONNECT within 30s")
		}
		return "", nil, err
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		cancel()
		cc.Close()
		return "", nil, fmt.Errorf("extended CONNECT: %s: %s", resp.Status, b)
	}
	return resp.Header.Get("Selected-ALPN"), &draftStream{Reader: resp.Body, Writer: pw,
		closer: func() error { pw.Close(); resp.Body.Close(); cancel(); return cc.Close() },
		local:  c.LocalAddr(), remote: c.RemoteAddr()}, nil
}

// oneConn is a listener that yields one connection, then waits to be closed.
type oneConn struct {
	mu   sync.Mutex
	c    net.Conn
	done chan struct{}
	once sync.Once
}

func (l *oneConn) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.c
	l.c = nil
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *oneConn) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *oneConn) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// draftApp serves appPage and its script (as startApp's app does) and counts
// the requests that came as TP forwards them.
func draftApp(seen *atomic.Int32) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, r *http.Request) {
		if forwarded(r) {
			seen.Add(1)
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprint(w, appPage)
	})
	mux.HandleFunc("/app.js", func(w http.ResponseWriter, r *http.Request) {
		if forwarded(r) {
			seen.Add(1)
		}
		w.Header().Set("Content-Type", "text/javascript")
		fmt.Fprint(w, `document.getElementById("out").textContent = "rendered by " + "app.js";`)
	})
	return mux
}

// A reverse-tunnel client written in the test from the draft's text (no TP
// client code) exposes an HTTP app on the real tpd, once over HTTP/1.1
// Upgrade (three tunnels, HTTP/1.1 inside: the draft's accept semantics, each
// tunnel one connection of TP's pool) and once over h2 extended CONNECT (one
// tunnel, h2 inside: many requests multiplexed on it); each time headless
// Chromium, with no client certificate, loads https://NAME/ through tpd and
// the page renders (its script, a second request down the tunnel, ran).
func TestHTTPDraftClientBrowser(t *testing.T) {
	parallel(t)
	srv := startServer(t, httpPolicy)
	rootPEM, root := rootOf(t, srv)
	home := strings.TrimPrefix(srv.login(t, "alice", "laptop")[0], "TP_HOME=")
	_, port, _ := net.SplitHostPort(srv.Addr)
	b := newBrowser(t, rootPEM)
	for _, tc := range []struct {
		version, label, alpn, selected string
		tunnels                        int
	}{
		{"http/1.1", "draft-h1", "http%2F1.1", "http%2F1.1", 3},
		{"h2", "draft-h2", "h2, http%2F1.1", "h2", 1},
	} {
		t.Run(tc.version, func(t *testing.T) {
			var seen atomic.Int32
			app := draftApp(&seen)
			for i := range tc.tunnels {
				sel, tun, err := draftReverse(srv.Addr, root, home, tc.version, tc.label, tc.alpn)
				if err != nil {
					t.Fatalf("tunnel %d over %s: %v", i, tc.version, err)
				}
				t.Cleanup(func() { tun.Close() })
				if sel != tc.selected {
					t.Fatalf("Selected-ALPN %q; want %q", sel, tc.selected)
				}
				if sel == "h2" {
					go (&http2.Server{}).ServeConn(tun, &http2.ServeConnOpts{Handler: app})
					continue
				}
				hs := &http.Server{Handler: app, ReadHeaderTimeout: 30 * time.Second}
				go hs.Serve(&oneConn{c: tun, done: make(chan struct{})})
				t.Cleanup(func() { hs.Close() })
			}
			name := tc.label + ".rev.tp.internal"
			dom, stderr := b.dom(t, name, "https://"+name+":"+port+"/")
			if !rendered(dom) {
				t.Fatalf("the app exposed by the draft's client over %s did not render:\n%s\nstderr:\n%s", tc.version, dom, stderr)
			}
			if n := seen.Load(); n < 2 {
				t.Errorf("the app saw %d requests as TP forwards them, want the page and its script", n)
			}
			if logs := srv.log.String(); !strings.Contains(logs, `msg="http request" site=`+name) {
				t.Errorf("no access-log line for %s in tpd's log", name)
			}
		})
	}
}

// tp meets a server for the first time: it fetches /.well-known/tp before its
// first connection and remembers the document in its transport cache beside
// the transport it used; here the server has QUIC off, so the document offers
// no quic and tp uses TLS.
func TestTPFetchesDiscoveryOnFirstMeeting(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy, "TP_QUIC=false")
	env := srv.login(t, "alice", "laptop")
	cache := filepath.Join(strings.TrimPrefix(env[0], "TP_HOME="), "transport-cache.json")
	if b, err := os.ReadFile(cache); err == nil && strings.Contains(string(b), `"software"`) {
		t.Fatalf("the transport cache holds a document before tp met the server:\n%s", b)
	}
	echo := testnet.Echo(t)
	_, eport, _ := net.SplitHostPort(echo)
	out, err := runErr(env, strings.NewReader("ping"), binary("tp"), "127.0.0.1", eport)
	if err != nil || !strings.HasSuffix(out, "ping") {
		t.Fatalf("tp to a loopback echo: %v\n%s", err, out)
	}
	b, err := os.ReadFile(cache)
	if err != nil || !strings.Contains(string(b), `"software": "tpd"`) || strings.Contains(string(b), `"name": "quic"`) ||
		!strings.Contains(string(b), `"name": "tls"`) {
		t.Fatalf("the transport cache after tp's first meeting (want tpd's discovery document, offering tls and no quic): %v\n%s", err, b)
	}
}

// The files dlogin keeps in $TP_HOME (cert.pem, key.pem, root.pem) are all
// Debian's curl needs to use the real tpd as an HTTPS proxy, as docs/HTTP.md
// §1.2 tells users: alice reaches a local HTTPS server through the proxy
// name; bob, whom the policy refuses, gets 403 with the policy's reason in
// Proxy-Status (the bad input: a destination the policy does not allow him).
func TestConnectCurlWithDloginFiles(t *testing.T) {
	parallel(t)
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal("curl is not installed: apt-get install curl (deploy/test.sh does)")
	}
	srv := startServer(t, testPolicy)
	_, port, _ := net.SplitHostPort(srv.Addr)
	dest := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "through tpd with dlogin's files")
	}))
	t.Cleanup(dest.Close)
	destPEM := filepath.Join(t.TempDir(), "dest.pem")
	if err := os.WriteFile(destPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: dest.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	through := func(env []string) (string, error) {
		h := strings.TrimPrefix(env[0], "TP_HOME=")
		return runErr(nil, nil, curl, "-sS", "-v", "--max-time", "60",
			"--proxy", "https://proxy.localhost:"+port, "--resolve", "proxy.localhost:"+port+":127.0.0.1",
			"--proxy-cert", filepath.Join(h, "cert.pem"), "--proxy-key", filepath.Join(h, "key.pem"),
			"--proxy-cacert", filepath.Join(h, "root.pem"), "--cacert", destPEM, dest.URL+"/")
	}
	out, err := through(srv.login(t, "alice", "laptop"))
	if err != nil || !strings.Contains(out, "through tpd with dlogin's files") {
		t.Fatalf("curl with alice's dlogin files: %v\n%s", err, out)
	}
	out, err = through(srv.login(t, "bob", "desk"))
	if err == nil || !strings.Contains(out, "< HTTP/1.1 403") ||
		!strings.Contains(out, "error=http_request_denied") || !strings.Contains(out, "is limited to alice and group ops") {
		t.Fatalf("curl with bob's dlogin files to a destination the policy refuses him: %v\n%s\nwant 403 with the policy's reason in Proxy-Status", err, out)
	}
}

// curl sends an http:// URL to an HTTPS proxy as a plain request in absolute
// form (GET http://host/…) unless -p tunnels it; tpd serves only CONNECT. Bad
// input: that plain request. tpd's answer once named the destination as the
// proxy ("curl --proxy https://DESTINATION …"), never mentioned -p, and gave
// --proxy-key device.key, the device key, with which curl fails (58). Now its
// curl line, run as written, reaches the http:// destination through tpd.
func TestConnectCurlHTTPTargetHint(t *testing.T) {
	parallel(t)
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal("curl is not installed: apt-get install curl (deploy/test.sh does)")
	}
	srv := startServer(t, testPolicy)
	_, port, _ := net.SplitHostPort(srv.Addr)
	dest := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "plain http through a CONNECT tunnel")
	}))
	t.Cleanup(dest.Close)
	home := strings.TrimPrefix(srv.login(t, "alice", "laptop")[0], "TP_HOME=")
	proxy := "proxy.localhost:" + port
	resolve := []string{"-sS", "--max-time", "60", "--resolve", "proxy.localhost:" + port + ":127.0.0.1"}

	hint, err := runErr(nil, nil, curl, append(resolve, "--proxy", "https://"+proxy,
		"--proxy-cert", filepath.Join(home, "cert.pem"), "--proxy-key", filepath.Join(home, "key.pem"),
		"--proxy-cacert", filepath.Join(home, "root.pem"), dest.URL+"/page")...)
	if err != nil {
		t.Fatalf("curl without -p to an http:// URL: %v\n%s", err, hint)
	}
	for _, want := range []string{"TP's HTTPS proxy https://" + proxy + " does not forward plain requests like GET " + dest.URL + "/page",
		"only CONNECT", "-p (--proxytunnel)", "https:// URL",
		"curl -p --proxy https://" + proxy + " --proxy-cert $TP_HOME/cert.pem --proxy-key $TP_HOME/key.pem --proxy-cacert $TP_HOME/root.pem " + dest.URL + "/page"} {
		if !strings.Contains(hint, want) {
			t.Errorf("tpd's answer to a plain GET lacks %q:\n%s", want, hint)
		}
	}
	destHost := strings.TrimPrefix(dest.URL, "http://")
	for _, bad := range []string{"--proxy https://" + destHost, "--proxy-key device.key", "device.pem"} {
		if strings.Contains(hint, bad) {
			t.Errorf("tpd's answer to a plain GET has %q:\n%s", bad, hint)
		}
	}

	// Follow the hint: its curl line, with $TP_HOME as dlogin keeps it.
	var line string
	for l := range strings.Lines(hint) {
		if strings.HasPrefix(strings.TrimSpace(l), "curl -p ") {
			line = strings.TrimSpace(l)
		}
	}
	if line == "" {
		t.Fatalf("tpd's answer to a plain GET has no curl -p line:\n%s", hint)
	}
	args := strings.Fields(os.Expand(line, func(v string) string {
		if v == "TP_HOME" {
			return home
		}
		return "$" + v
	}))
	out, err := runErr(nil, nil, curl, append(resolve, args[1:]...)...)
	if err != nil || out != "plain http through a CONNECT tunnel" {
		t.Fatalf("the hint's curl line %q: %v\n%s", line, err, out)
	}
}
