package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// clientThrough is an HTTP/1.1 client that sends every request for any name
// to addr (as DNS pointing the name at that instance would), trusting root,
// presenting cert when it is not nil.
func clientThrough(addr string, root *x509.CertPool, cert *tls.Certificate) *http.Client {
	cfg := &tls.Config{RootCAs: root, NextProtos: []string{"http/1.1"}}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig: cfg,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
		DisableKeepAlives: true, // every request a new handshake: what each one proves is its own
	}}
}

// A name exposed with `tp expose --http --devices-only` on instance A and
// reached through instance B: B learns from the name's route (the claim
// recorded devices_only in tp_holds) that it is devices-only, so B's own
// handshake asks for the device certificate. Bob's device certificate gets the
// page through B (A logs the peer session with bob's device as the dialer);
// the same request without a certificate fails at B's handshake and the app
// never sees it (the bad input: no client certificate for a devices-only
// name). Once bob's device is revoked, its certificate is refused through B
// too. Before the route carried the access mode, B did not ask for the
// certificate and A answered 403 even to bob's device.
func TestPGPeerHTTPDevicesOnlyOnOtherInstance(t *testing.T) {
	parallel(t)
	raceTPD(t)
	srvs := startPeers(t, 2, httpPolicy, nil)
	a, b := srvs[0], srvs[1]
	alice := a.login(t, "alice", "laptop")
	bob := b.login(t, "bob", "phone")
	var seen atomic.Int32
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen.Add(1)
		fmt.Fprint(w, appPage)
	}))
	t.Cleanup(app.Close)
	const name = "private.rev.tp.internal"
	startExposeHTTP(t, alice, "private", app.URL, "--devices-only")

	_, root := rootOf(t, a)
	home := strings.TrimPrefix(bob[0], "TP_HOME=")
	cert, err := tls.LoadX509KeyPair(filepath.Join(home, "cert.pem"), filepath.Join(home, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(b.Addr)
	url := "https://" + name + ":" + port + "/"
	get := func(c *http.Client) (int, string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := c.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), err
	}

	withCert := clientThrough(b.Addr, root, &cert)
	if status, body, err := get(withCert); err != nil || status != http.StatusOK || body != appPage {
		t.Fatalf("bob's device through B for the devices-only name: %d %q %v; want 200 and the page", status, body, err)
	}
	if n := seen.Load(); n != 1 {
		t.Fatalf("the app saw %d requests after bob's, want 1", n)
	}
	waitLog(t, a.log, `dialer=bob@phone`, 10*time.Second)
	waitLog(t, a.log, `http_status=200`, 10*time.Second)

	status, body, err := get(clientThrough(b.Addr, root, nil))
	if err == nil {
		t.Errorf("no client certificate through B for the devices-only name: %d %q; want the handshake refused", status, body)
	}
	waitLog(t, b.log, "client didn't provide a certificate", 30*time.Second)
	if n := seen.Load(); n != 1 {
		t.Errorf("the app saw %d requests, want only bob's", n)
	}

	// Bob's device is revoked: B refuses its certificate at the handshake.
	run(t, nil, binary("tpd"), "revoke", "--device", "bob@phone", "--data-dir", a.DataDir)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, _, err := get(withCert); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("bob's revoked device still reaches the devices-only name through B 30s after tpd revoke")
		}
		time.Sleep(100 * time.Millisecond) // polling for the revocation, bounded by the deadline above
	}
	before := seen.Load()
	if _, _, err := get(withCert); err == nil || seen.Load() != before {
		t.Errorf("bob's revoked device through B: %v, the app saw %d requests more; want the handshake refused and none", err, seen.Load()-before)
	}
}

// A WebSocket app exposed with `tp expose --http --http1` on instance A and
// opened through instance B: B forwards the Upgrade over a peer connection, A
// sends it down the tunnel, and after the app's 101 the peer connection is the
// upgraded stream both ways. A Go WebSocket client (github.com/coder/websocket)
// sends 64 messages of up to 64 KiB and one of 1 MiB; each echo comes back
// byte for byte (checksummed). The close handshake ends it cleanly, and A logs
// the upgraded stream as closed, not aborted.
func TestPGPeerHTTPUpgradeOnOtherInstance(t *testing.T) {
	parallel(t)
	raceTPD(t)
	srvs := startPeers(t, 2, httpPolicy, nil)
	a, b := srvs[0], srvs[1]
	alice := a.login(t, "alice", "laptop")
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return // Accept answered the client
		}
		defer c.CloseNow()
		c.SetReadLimit(2 << 20)
		if r.URL.Path == "/cut" { // one echo, then the connection drops without a close frame
			typ, msg, err := c.Read(r.Context())
			if err == nil {
				_ = c.Write(r.Context(), typ, msg)
			}
			return
		}
		for {
			typ, msg, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if err := c.Write(r.Context(), typ, msg); err != nil {
				return
			}
		}
	}))
	t.Cleanup(app.Close)
	const name = "echo.rev.tp.internal"
	startExposeHTTP(t, alice, "echo", app.URL, "--http1")

	_, root := rootOf(t, a)
	_, port, _ := net.SplitHostPort(b.Addr)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, "wss://"+name+":"+port+"/ws", &websocket.DialOptions{HTTPClient: clientThrough(b.Addr, root, nil)})
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("WebSocket to %s through B: %v (status %d)", name, err, status)
	}
	defer c.CloseNow()
	c.SetReadLimit(2 << 20)
	sizes := make([]int, 0, 65)
	for i := range 64 {
		sizes = append(sizes, 1+i*1024)
	}
	sizes = append(sizes, 1<<20)
	for i, n := range sizes {
		msg := make([]byte, n)
		rand.Read(msg)
		if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
			t.Fatalf("message %d (%d bytes) through B: %v", i, n, err)
		}
		typ, got, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("echo of message %d (%d bytes) through B: %v", i, n, err)
		}
		if typ != websocket.MessageBinary || !bytes.Equal(got, msg) {
			t.Fatalf("echo of message %d: %d bytes, sha256 %x; want %d bytes, sha256 %x",
				i, len(got), sha256.Sum256(got), n, sha256.Sum256(msg))
		}
	}
	if err := c.Close(websocket.StatusNormalClosure, "done"); err != nil {
		t.Fatalf("closing the WebSocket through B: %v", err)
	}
	waitLog(t, b.log, `msg="http request" site=`+name, 10*time.Second)
	waitLog(t, a.log, "http_status=101", 10*time.Second)
	waitLog(t, a.log, "upgraded stream closed", 30*time.Second)
	if strings.Contains(a.log.String(), "upgraded stream aborted") {
		t.Errorf("A logged the upgraded stream as aborted after a clean close:\n%s", a.log.String())
	}

	// The same name on the serving instance itself (no hop), as a baseline
	// that the local path carries the upgrade too.
	local, _, err := websocket.Dial(ctx, "wss://"+name+":"+portOf(t, a)+"/ws", &websocket.DialOptions{HTTPClient: clientThrough(a.Addr, root, nil)})
	if err != nil {
		t.Fatalf("WebSocket to %s through A: %v", name, err)
	}
	if err := local.Write(ctx, websocket.MessageText, []byte("local")); err != nil {
		t.Fatal(err)
	}
	if _, got, err := local.Read(ctx); err != nil || string(got) != "local" {
		t.Fatalf("echo through A: %q %v", got, err)
	}
	if err := local.Close(websocket.StatusNormalClosure, "done"); err != nil {
		t.Fatalf("closing the WebSocket through A: %v", err)
	}

	// The app drops a WebSocket without its close handshake (the bad input: a
	// cut upgraded stream): the client through B sees the connection end
	// without a close frame, never a normal closure.
	c, _, err = websocket.Dial(ctx, "wss://"+name+":"+port+"/cut", &websocket.DialOptions{HTTPClient: clientThrough(b.Addr, root, nil)})
	if err != nil {
		t.Fatalf("WebSocket to %s/cut through B: %v", name, err)
	}
	defer c.CloseNow()
	if err := c.Write(ctx, websocket.MessageText, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, got, err := c.Read(ctx); err != nil || string(got) != "hello" {
		t.Fatalf("echo before the cut: %q %v", got, err)
	}
	if _, _, err := c.Read(ctx); err == nil || websocket.CloseStatus(err) != -1 {
		t.Errorf("reading after the app dropped the WebSocket: %v (close status %d); want an error without a close frame", err, websocket.CloseStatus(err))
	}

	// The same app exposed with the default tunnels (h2 inside): h2 cannot
	// carry an Upgrade, so the WebSocket gets 502 and A's log says to use
	// --http1 (the bad input: an Upgrade for a name served over h2 tunnels).
	startExposeHTTP(t, alice, "echo2", app.URL)
	_, resp, err = websocket.Dial(ctx, "wss://echo2.rev.tp.internal:"+port+"/ws", &websocket.DialOptions{HTTPClient: clientThrough(b.Addr, root, nil)})
	if err == nil || resp == nil || resp.StatusCode != http.StatusBadGateway {
		t.Errorf("WebSocket to a name served over h2 tunnels: %v %v; want 502", resp, err)
	}
	waitLog(t, a.log, "tp expose --http --http1", 10*time.Second)
}

func portOf(t *testing.T, s *server) string {
	t.Helper()
	_, port, err := net.SplitHostPort(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	return port
}
