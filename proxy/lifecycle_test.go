package proxy_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/proxy"
)

// TestWeb: http/1.1 and h2 requests without a client certificate reach the Web
// handler over the same listener as the proxy.
func TestWeb(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	for _, tt := range []struct {
		name      string
		transport *http.Transport
		proto     string
	}{
		{"http/1.1", &http.Transport{TLSClientConfig: e.clientTLS(nil)}, "HTTP/1.1"},
		{"h2", &http.Transport{TLSClientConfig: e.clientTLS(nil), ForceAttemptHTTP2: true}, "HTTP/2.0"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			defer tt.transport.CloseIdleConnections()
			client := &http.Client{Transport: tt.transport, Timeout: 10 * time.Second}
			for range 2 { // the second request reuses the connection
				resp, err := client.Get("https://" + e.addr + "/")
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(body) != "hello web" || resp.Proto != tt.proto || resp.Header.Get("X-Proto") != tt.proto {
					t.Fatalf("%s %s %q (handler saw %s); want 200 %s", resp.Status, resp.Proto, body, resp.Header.Get("X-Proto"), tt.proto)
				}
			}
		})
	}
	e.mustEcho(t)
}

// TestNoWeb: with WebTLS nil, a handshake without ALPN "tp/1" fails.
func TestNoWeb(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) { c.WebTLS, c.Web = nil, nil })
	cfg := e.clientTLS(nil)
	cfg.NextProtos = []string{"http/1.1"}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err == nil {
		c.Close()
		t.Fatal("web handshake succeeded without WebTLS")
	}
	e.mustEcho(t)
}

func TestNewValidates(t *testing.T) {
	t.Parallel()
	_, err := proxy.New(proxy.Config{ProxyTLS: &tls.Config{ClientAuth: tls.RequestClientCert}, WebTLS: &tls.Config{}})
	if err == nil {
		t.Fatal("New accepted an invalid config")
	}
	for _, want := range []string{"RequireAndVerifyClientCert", "ClientCAs", "Certificates", "Web handler", "Identify", "Authorizer"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}

// TestShutdown: Shutdown is idempotent, Serve returns ErrServerClosed, and a live
// session is forced closed when the Shutdown context ends.
func TestShutdown(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	c, err := e.dialer().DialContext(context.Background(), "tcp", e.echo)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := e.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with a live session = %v; want DeadlineExceeded", err)
	}
	select {
	case err := <-e.served:
		if !errors.Is(err, proxy.ErrServerClosed) {
			t.Fatalf("Serve = %v; want ErrServerClosed", err)
		}
		e.served <- err // for the cleanup
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after Shutdown")
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("forced Shutdown left the session open")
		}
	}
	for range 2 {
		if err := e.srv.Shutdown(context.Background()); err != nil {
			t.Fatalf("repeated Shutdown = %v", err)
		}
	}
	if _, err := e.dialer().DialContext(context.Background(), "tcp", e.echo); err == nil {
		t.Fatal("dial succeeded after Shutdown")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.srv.Serve(context.Background(), ln); !errors.Is(err, proxy.ErrServerClosed) {
		t.Fatalf("Serve after Shutdown = %v", err)
	}
}

// TestShutdownDrains: Shutdown waits for a live session that ends by itself.
func TestShutdownDrains(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	c, err := e.dialer().DialContext(context.Background(), "tcp", e.echo)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- e.srv.Shutdown(context.Background()) }()
	// The session still works during the drain.
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "drain"); err != nil {
		t.Fatal(err)
	}
	_ = c.(interface{ CloseWrite() error }).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "drain" {
		t.Fatalf("echo during drain = %q, %v", got, err)
	}
	c.Close()
	if err := <-done; err != nil {
		t.Fatalf("Shutdown = %v", err)
	}
}

// TestMaxConns: with MaxConns 1 and one session open, the next connection is closed
// right after accept; once the first ends, dials work again.
func TestMaxConns(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) { c.MaxConns = 1 })
	c, err := e.dialer().DialContext(context.Background(), "tcp", e.echo)
	if err != nil {
		t.Fatal(err)
	}
	if c2, err := e.dialer().DialContext(context.Background(), "tcp", e.echo); err == nil {
		c2.Close()
		t.Fatal("second connection accepted over MaxConns")
	}
	c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c3, err := e.dialer().DialContext(context.Background(), "tcp", e.echo)
		if err == nil {
			c3.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot never released: %v", err)
		}
		runtime.Gosched() // poll; each attempt is a full dial
	}
}

// Anyone on the Internet can open website connections; holding them open with a
// request body that never comes (bad input: Content-Length 100000, one byte sent)
// must neither take the proxy's slots nor hold a website slot for ever.
func TestWebCannotStarveProxy(t *testing.T) { // not parallel: it shortens the process's web body idle time
	defer proxy.SetWebBodyIdle(300 * time.Millisecond)()
	e := newEnv(t, func(c *proxy.Config) { c.MaxConns = 4 }) // MaxWebConns defaults to 2
	slow := func() *tls.Conn {
		cfg := e.clientTLS(nil)
		cfg.NextProtos = []string{"http/1.1"}
		c, err := tls.Dial("tcp", e.addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := io.WriteString(c, "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\nx"); err != nil {
			t.Fatal(err)
		}
		return c
	}
	var conns []*tls.Conn
	for range 6 {
		conns = append(conns, slow())
	}
	// The proxy still has its slots.
	e.mustEcho(t)
	// Every stalled connection is closed by the server: over the website budget at
	// once, the others when their body stalls.
	for i, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.Copy(io.Discard, c); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("stalled website connection %d was still open after 10s", i)
		}
	}
	e.mustEcho(t)
}

// One address cannot hold more than MaxHandshakesPerIP connections that never
// finish their TLS handshake (bad input: TCP connections that send nothing); the
// next one is closed at once, and the bound frees as handshakes end.
func TestHandshakesPerIPBounded(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) { c.MaxHandshakesPerIP = 2 })
	var stalled []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		stalled = append(stalled, c)
	}
	// The third is closed by the server without waiting for the handshake timeout.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			break // closed by the server: the bound holds
		}
		if time.Now().After(deadline) {
			t.Fatal("a third unfinished handshake from one address was kept open")
		}
	}
	for _, c := range stalled {
		c.Close()
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		c, err := e.dialer().DialContext(context.Background(), "tcp", e.echo)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the bound did not free after the stalled handshakes ended: %v", err)
		}
		runtime.Gosched() // poll; each attempt is a full dial
	}
}
