package proxy_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A website name the server does not know fails the handshake with the alert
// unrecognized_name; known names keep working, and so does the proxy.
func TestUnknownWebName(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) {
		c.WebNames = func(name string) bool { return name == "localhost" }
	})
	cfg := e.clientTLS(nil)
	cfg.ServerName = "unknown.test"
	// The server must refuse before it shows any certificate; skipping verification
	// makes sure the refusal we see is the server's alert, not our own check.
	cfg.InsecureSkipVerify = true
	_, err := tls.Dial("tcp", e.addr, cfg)
	if err == nil || !strings.Contains(err.Error(), "unrecognized name") {
		t.Fatalf("handshake for an unknown name: %v; want alert unrecognized_name (112)", err)
	}
	c, err := tls.Dial("tcp", e.addr, e.clientTLS(nil))
	if err != nil {
		t.Fatalf("known name: %v", err)
	}
	c.Close()
	e.mustEcho(t)
}

// ticketCache is a client session cache that remembers the last ticket it got.
type ticketCache struct {
	mu    sync.Mutex
	inner tls.ClientSessionCache
	last  []byte
	got   int // tickets received
}

func (c *ticketCache) Get(key string) (*tls.ClientSessionState, bool) { return c.inner.Get(key) }
func (c *ticketCache) Put(key string, cs *tls.ClientSessionState) {
	if cs != nil {
		if ticket, _, err := cs.ResumptionState(); err == nil {
			c.mu.Lock()
			c.last = ticket
			c.got++
			c.mu.Unlock()
		}
	}
	c.inner.Put(key, cs)
}

func (c *ticketCache) ticket() []byte { c.mu.Lock(); defer c.mu.Unlock(); return c.last }

func (c *ticketCache) received() int { c.mu.Lock(); defer c.mu.Unlock(); return c.got }

// handshake completes a handshake and reads until the server's session ticket has
// arrived (TLS 1.3 sends it after the handshake).
func handshake(t *testing.T, addr string, cfg *tls.Config) tls.ConnectionState {
	t.Helper()
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cs := c.ConnectionState()
	if cs.NegotiatedProtocol == "http/1.1" {
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
		io.ReadAll(c)
	} else if tc, ok := cfg.ClientSessionCache.(*ticketCache); ok {
		// The proxy sends nothing after its ticket (it waits for a hello), and a
		// read takes the ticket in but returns only with data or at its
		// deadline: read in short slices until the ticket is in, however long
		// a loaded machine takes to send it.
		before := tc.received()
		for deadline := time.Now().Add(20 * time.Second); tc.received() == before && time.Now().Before(deadline); {
			c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			if _, err := c.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
		}
	}
	return cs
}

// The website and the proxy have separate session-ticket keys: each resumes its
// own sessions, and a ticket from one never resumes into the other.
func TestSessionTicketsSeparate(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	web := &ticketCache{inner: tls.NewLRUClientSessionCache(4)}
	webCfg := e.clientTLS(nil)
	webCfg.NextProtos = []string{"http/1.1"}
	webCfg.ClientSessionCache = web
	handshake(t, e.addr, webCfg)
	webTicket := web.ticket()
	if webTicket == nil {
		t.Fatal("the website issued no session ticket")
	}
	if cs := handshake(t, e.addr, webCfg); !cs.DidResume {
		t.Fatal("a website session did not resume on the website")
	}

	px := &ticketCache{inner: tls.NewLRUClientSessionCache(4)}
	pxCfg := e.clientTLS(&e.cert)
	pxCfg.NextProtos = []string{wire.ALPN}
	pxCfg.ClientSessionCache = px
	handshake(t, e.addr, pxCfg)
	pxTicket := px.ticket()
	if pxTicket == nil {
		t.Fatal("the proxy issued no session ticket")
	}
	if cs := handshake(t, e.addr, pxCfg); !cs.DidResume {
		t.Fatal("a proxy session did not resume on the proxy")
	}

	// The same session cache for both: each handshake offers the other's ticket.
	webCfg.ClientSessionCache, pxCfg.ClientSessionCache = px, web
	if cs := handshake(t, e.addr, pxCfg); cs.DidResume {
		t.Error("a website ticket resumed a proxy session")
	}
	if cs := handshake(t, e.addr, webCfg); cs.DidResume {
		t.Error("a proxy ticket resumed a website session")
	}
	// And below what the client certificate rules of crypto/tls would catch: the
	// keys themselves differ.
	if proxy.DecryptsTicket(e.srv, true, webTicket) || !proxy.DecryptsTicket(e.srv, false, webTicket) {
		t.Error("a website ticket opens with the proxy's keys, or not with the website's")
	}
	if proxy.DecryptsTicket(e.srv, false, pxTicket) || !proxy.DecryptsTicket(e.srv, true, pxTicket) {
		t.Error("a proxy ticket opens with the website's keys, or not with the proxy's")
	}
}

// A "tp/1" ClientHello without a client certificate is refused at the handshake
// while the website keeps serving on the same listener.
func TestProxyWithoutCertRefusedWebServes(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	cfg := e.clientTLS(nil)
	cfg.NextProtos = []string{wire.ALPN}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err == nil {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1)) // TLS 1.3: the refusal arrives on the first read
		c.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "certificate required") {
		t.Fatalf("tp/1 without certificate: %v; want alert certificate_required (116)", err)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: e.clientTLS(nil), ForceAttemptHTTP2: true}, Timeout: 10 * time.Second}
	resp, err := client.Get("https://" + e.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
		t.Fatalf("website after a refused proxy handshake: %s %s", resp.Status, resp.Proto)
	}
}

// An "acme-tls/1" handshake is answered by the website configuration (whose
// certificate callback serves tls-alpn-01 challenges) and then closed.
func TestACMETLSALPN(t *testing.T) {
	t.Parallel()
	var sawACME sync.Map
	e := newEnv(t, func(c *proxy.Config) {
		cert := c.WebTLS.Certificates[0]
		c.WebTLS = &tls.Config{
			NextProtos: []string{"h2", "http/1.1", proxy.ALPNACME},
			GetCertificate: func(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
				if len(h.SupportedProtos) == 1 && h.SupportedProtos[0] == proxy.ALPNACME {
					sawACME.Store(h.ServerName, true)
				}
				return &cert, nil
			},
		}
	})
	cfg := e.clientTLS(nil)
	cfg.NextProtos = []string{proxy.ALPNACME}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if p := c.ConnectionState().NegotiatedProtocol; p != proxy.ALPNACME {
		t.Fatalf("negotiated %q", p)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Errorf("after an acme-tls/1 handshake: %v; want the server to close", err)
	}
	if _, ok := sawACME.Load("localhost"); !ok {
		t.Error("the certificate callback did not see the acme-tls/1 handshake")
	}
}

// startTLSEcho runs a plain TLS server (a pass-through backend) that answers
// "backend:" + what it reads, and reports the SNI it saw.
func startTLSEcho(t *testing.T, cert tls.Certificate) (string, chan string) {
	t.Helper()
	sni := make(chan string, 4)
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			sni <- h.ServerName
			return nil, nil
		},
	}
	addr := testnet.Serve(t, func(raw *net.TCPConn) {
		c := tls.Server(raw, cfg)
		defer c.Close()
		b, _ := io.ReadAll(c) // until the client's close_notify
		io.WriteString(c, "backend:"+string(b))
	})
	return addr, sni
}

// Names registered for pass-through reach their backend with TLS untouched: the
// client completes its handshake with the backend's certificate, half-close
// works, and every other name still gets the proxy or the website.
func TestPassthrough(t *testing.T) {
	t.Parallel()
	var backend string
	var calls sync.Map
	e := newEnv(t, func(c *proxy.Config) {
		c.Passthrough = func(name string) (func(context.Context, net.Conn), bool) {
			calls.Store(name, true)
			if name != "exposed.test" {
				return nil, false
			}
			return func(ctx context.Context, conn net.Conn) {
				defer conn.Close()
				up, err := net.Dial("tcp", backend)
				if err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{})
				go func() {
					io.Copy(up, conn)
					up.(*net.TCPConn).CloseWrite()
					close(done)
				}()
				io.Copy(conn, up)
				conn.(interface{ CloseWrite() error }).CloseWrite()
				<-done
			}, true
		}
	})
	backendCert := e.ca.ServerCert(t, "exposed.test")
	var sni chan string
	backend, sni = startTLSEcho(t, backendCert)

	cfg := e.clientTLS(nil)
	cfg.ServerName = "Exposed.Test."
	cfg.NextProtos = []string{wire.ALPN, "h2"} // even tp/1 goes to the backend for this name
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatalf("pass-through handshake: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	leaf := c.ConnectionState().PeerCertificates[0]
	if leaf.DNSNames[0] != "exposed.test" {
		t.Errorf("client saw certificate for %v, not the backend's", leaf.DNSNames)
	}
	if got := <-sni; got != "Exposed.Test" {
		t.Errorf("backend saw SNI %q", got)
	}
	io.WriteString(c, "hello")
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "backend:hello" {
		t.Fatalf("through pass-through: %q, %v", got, err)
	}
	if _, ok := calls.Load("exposed.test"); !ok {
		t.Error("Passthrough was not asked with the canonical name")
	}

	// Other names: website and proxy as usual.
	resp, err := (&http.Client{Transport: &http.Transport{TLSClientConfig: e.clientTLS(nil), DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", e.addr)
	}}, Timeout: 10 * time.Second}).Get("https://localhost/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("website beside pass-through: %s", resp.Status)
	}
	e.mustEcho(t)
}

// Over QUIC, "h3" gets the website over HTTP/3 and "tp/1" the proxy, on one UDP
// port; HTTP/1.1 and h2 responses advertise HTTP/3 with Alt-Svc.
func TestHTTP3BesideProxy(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	tr := &http3.Transport{TLSClientConfig: q.clientTLS(nil), QUICConfig: &quic.Config{}}
	defer tr.Close()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for range 2 {
		resp, err := client.Get("https://" + q.udpAddr + "/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "hello web" || resp.Proto != "HTTP/3.0" || resp.Header.Get("X-Proto") != "HTTP/3.0" {
			t.Fatalf("h3: %s %s %q", resp.Status, resp.Proto, body)
		}
	}
	// The proxy over QUIC at the same time.
	d := q.quicDialer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := d.DialContext(ctx, "tcp", q.echo)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(conn, "ping")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("tunnel beside h3: %q %v", buf, err)
	}
	conn.Close()

	h1 := &http.Client{Transport: &http.Transport{TLSClientConfig: q.clientTLS(nil)}, Timeout: 10 * time.Second}
	resp, err := h1.Get("https://" + q.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	_, port, _ := net.SplitHostPort(q.addr)
	if got, want := resp.Header.Get("Alt-Svc"), `h3=":`+port+`"; ma=86400`; got != want {
		t.Errorf("Alt-Svc %q, want %q", got, want)
	}
	// A QUIC client offering neither h3 nor tp/1 is refused.
	qc, err := quic.DialAddr(ctx, q.udpAddr, &tls.Config{RootCAs: q.ca.Pool, ServerName: "localhost", NextProtos: []string{"other"}}, nil)
	if err == nil {
		qc.CloseWithError(0, "")
		t.Error("QUIC handshake with an unknown ALPN succeeded")
	} else if !strings.Contains(err.Error(), "no_application_protocol") && !strings.Contains(err.Error(), "no application protocol") {
		t.Logf("unknown ALPN refused with: %v", err)
	}
}

// A devices-only website name (Config.DevicesOnly) asks for the client
// certificate at the handshake and verifies it as the proxy does (ClientCAs,
// ProxyTLS.VerifyConnection), then serves the website with the verified
// certificate in Request.TLS, over HTTP/1.1 and h2. Bad inputs: no certificate
// (alert certificate_required), a certificate from another CA, one that
// VerifyConnection refuses — each refused at the handshake, the website seeing
// nothing. Other names (here a handshake without SNI) get no CertificateRequest.
func TestDevicesOnlyHandshake(t *testing.T) {
	t.Parallel()
	var served sync.Map // client CNs the website saw
	e := newEnv(t, func(c *proxy.Config) {
		c.ProxyTLS.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) > 0 && cs.PeerCertificates[0].Subject.CommonName == "revoked@phone" {
				return errors.New("device revoked")
			}
			return nil
		}
		c.DevicesOnly = func(name string) bool { return name == "localhost" }
		c.Web = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			cn := "none"
			if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
				cn = r.TLS.PeerCertificates[0].Subject.CommonName
			}
			served.Store(cn, true)
			_, _ = io.WriteString(w, r.Proto+" "+cn)
		})
	})
	get := func(cert *tls.Certificate, h2 bool, serverName string) (string, error) {
		cfg := e.clientTLS(cert)
		cfg.ServerName = serverName
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: h2}, Timeout: 10 * time.Second}
		defer client.CloseIdleConnections()
		resp, err := client.Get("https://" + e.addr + "/")
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.Status + " " + string(b), err
	}
	for _, h2 := range []bool{false, true} {
		want := "200 OK HTTP/1.1 alice@laptop"
		if h2 {
			want = "200 OK HTTP/2.0 alice@laptop"
		}
		if got, err := get(&e.cert, h2, "localhost"); err != nil || got != want {
			t.Errorf("devices-only name with a device certificate (h2 %v): %q, %v; want %q", h2, got, err, want)
		}
	}
	stranger := testpki.New(t).ClientCert(t, "mallory@pc", testpki.LeafOptions{})
	revoked := e.ca.ClientCert(t, "revoked@phone", testpki.LeafOptions{})
	for _, tc := range []struct {
		what string
		cert *tls.Certificate
		want string // in the client's error
	}{
		{"no certificate", nil, "certificate required"},
		{"a certificate from another CA", &stranger, "remote error: tls"},
		{"a certificate VerifyConnection refuses", &revoked, "remote error: tls"},
	} {
		// TLS 1.3: the refusal arrives on the client's first read. The client
		// sends nothing after its Finished, so the alert is never raced by a reset.
		cfg := e.clientTLS(tc.cert)
		cfg.NextProtos = []string{"h2", "http/1.1"}
		c, err := tls.Dial("tcp", e.addr, cfg)
		if err == nil {
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("devices-only name with %s: %v; want a refused handshake (%q)", tc.what, err, tc.want)
		}
	}
	for _, cn := range []string{"none", "mallory@pc", "revoked@phone"} {
		if _, ok := served.Load(cn); ok {
			t.Errorf("the website served a request from %s on the devices-only name", cn)
		}
	}

	var asked bool
	cfg := e.clientTLS(nil)
	cfg.ServerName = "127.0.0.1" // no SNI: not a devices-only name
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		asked = true
		return &tls.Certificate{}, nil
	}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if asked {
		t.Error("a handshake for a name that is not devices-only sent a CertificateRequest")
	}
}
