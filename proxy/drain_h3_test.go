package proxy_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/proxy"
)

// A shutdown is not held by an HTTP/3 client that went away without closing its
// connection (bad input: a client whose UDP socket vanished after a request,
// as a phone's does when it loses the network), while a request still in
// flight on another HTTP/3 connection is served to its end, past the grace
// that idle connections get.
func TestHTTP3DrainNotHeldByGoneClient(t *testing.T) {
	t.Parallel()
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Web = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" {
				started <- struct{}{}
				<-release
			}
			_, _ = io.WriteString(w, "hello web")
		})
	}, proxy.QUICOptions{IdleTimeout: 10 * time.Minute}) // only the drain may end the gone client's connection
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// h3Client is an HTTP/3 connection on a UDP socket of its own, which
	// outlives the server's idle timeout unless closed.
	h3Client := func() (*net.UDPConn, *http3.ClientConn) {
		udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		tr := &quic.Transport{Conn: udp}
		t.Cleanup(func() { _ = tr.Close() })
		raddr, err := net.ResolveUDPAddr("udp", q.udpAddr)
		if err != nil {
			t.Fatal(err)
		}
		tlsCfg := q.clientTLS(nil)
		tlsCfg.NextProtos = []string{http3.NextProtoH3}
		conn, err := tr.Dial(ctx, raddr, tlsCfg, &quic.Config{MaxIdleTimeout: 10 * time.Minute})
		if err != nil {
			t.Fatalf("QUIC to the website: %v", err)
		}
		return udp, (&http3.Transport{}).NewClientConn(conn)
	}
	get := func(cc *http3.ClientConn, path string) (string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://localhost"+path, nil)
		if err != nil {
			return "", err
		}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}

	goneUDP, gone := h3Client()
	if body, err := get(gone, "/"); err != nil || body != "hello web" {
		t.Fatalf("GET / over HTTP/3: %q, %v", body, err)
	}
	_ = goneUDP.Close() // the client vanishes: no CONNECTION_CLOSE reaches the server

	_, busy := h3Client()
	slow := make(chan string, 1)
	go func() {
		body, err := get(busy, "/slow")
		if err != nil {
			body = err.Error()
		}
		slow <- body
	}()
	select {
	case <-started:
	case <-ctx.Done():
		t.Fatal("the slow request did not reach the handler")
	}

	sctx, scancel := context.WithTimeout(context.Background(), time.Minute)
	defer scancel()
	shut := make(chan error, 1)
	go func() { shut <- q.srv.Shutdown(sctx) }()
	// The request in flight outlives the grace idle connections get: waiting
	// it out is what this part tests.
	time.Sleep(3 * proxy.H3IdleGrace)
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) while a request was in flight", err)
	default:
	}
	close(release)
	if body := <-slow; body != "hello web" {
		t.Fatalf("the request in flight during the drain: %q; want it served to its end", body)
	}
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v; want it to end once no request is in flight, not when its context does", err)
	}
}
