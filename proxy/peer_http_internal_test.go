package proxy

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// A 101's upgraded stream from another instance ends cleanly with the
// request's context: the relay (httputil.ReverseProxy) returns from its
// handler, which ends the request's context, and closes the stream just
// after, from another goroutine; whichever comes first, the serving instance
// reads all that was sent, then a clean end, never a reset. Before, the
// context's end aborted the peer connection whenever it won that race, and A
// logged a WebSocket both ends had closed cleanly as cut
// (TestPGPeerHTTPUpgradeOnOtherInstance, a few runs in ten under load).
func TestPeerUpgradeEndsCleanlyWithRequestContext(t *testing.T) {
	for _, closeToo := range []bool{false, true} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		type result struct {
			got []byte
			err error
		}
		served := make(chan result, 1)
		go func() { // instance A: answers 101, echoes one line, then reads to the end
			c, err := ln.Accept()
			if err != nil {
				served <- result{err: err}
				return
			}
			defer c.Close()
			br := bufio.NewReader(c)
			if _, err := http.ReadRequest(br); err != nil {
				served <- result{err: err}
				return
			}
			_, _ = io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
			line, err := br.ReadString('\n')
			if err != nil {
				served <- result{err: err}
				return
			}
			_, _ = io.WriteString(c, line)
			rest, err := io.ReadAll(br)
			served <- result{got: append([]byte(line), rest...), err: err}
		}()

		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://echo.rev.tp.internal/ws", nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		resp, err := peerExchange(req, conn, "instance A")
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("status %d, want 101", resp.StatusCode)
		}
		rw := resp.Body.(io.ReadWriteCloser)
		if _, err := io.WriteString(rw, "through the stream\n"); err != nil {
			t.Fatal(err)
		}
		echo := make([]byte, len("through the stream\n"))
		if _, err := io.ReadFull(rw, echo); err != nil {
			t.Fatalf("reading the echo: %v", err)
		}
		if _, err := io.WriteString(rw, "last\n"); err != nil {
			t.Fatal(err)
		}
		cancel() // the handler that relayed the stream returned
		if closeToo {
			if err := rw.Close(); err != nil { // … and its relay closes it
				t.Fatalf("closing the upgraded stream: %v", err)
			}
		}
		select {
		case r := <-served:
			if r.err != nil {
				t.Fatalf("close too %v: instance A read %q, then %v; want a clean end", closeToo, r.got, r.err)
			}
			if string(r.got) != "through the stream\nlast\n" {
				t.Fatalf("instance A read %q", r.got)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("close too %v: instance A did not see the upgraded stream end within 30s of the request's end", closeToo)
		}
	}
}

// The bad input: the app behind A answers 101 with another protocol than the
// one asked for (h2c to a WebSocket request). The relay would answer 502 and
// never close such a stream, leaving the peer connection open on both
// instances: it is refused at once, and A sees an abort.
func TestPeerUpgradeOtherProtocolRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	served := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			served <- err
			return
		}
		_, _ = io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
		_, err = io.ReadAll(br)
		served <- err
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://echo.rev.tp.internal/ws", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	if _, err := peerExchange(req, conn, "instance A"); err == nil || !strings.Contains(err.Error(), `101 Switching Protocols to "h2c" for a request that asked for "websocket"`) {
		t.Fatalf("a 101 to h2c for a WebSocket request: %v; want it refused", err)
	}
	select {
	case err := <-served:
		if err == nil {
			t.Fatal("instance A read a clean end after its 101 was refused; want an abort")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("instance A's stream stayed open after its 101 was refused")
	}
}

// Before the 101, the request's context ending aborts the peer connection: A
// sees a reset, not the end of a request (the bad input: a client that went
// away while A was still answering).
func TestPeerExchangeAbortsBeforeResponse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	served := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			served <- err
			return
		}
		_, err = io.ReadAll(br) // never answers: waits for the end
		served <- err
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://echo.rev.tp.internal/", nil)
	done := make(chan error, 1)
	go func() {
		_, err := peerExchange(req, conn, "instance A")
		done <- err
	}()
	cancel()
	if err := <-done; err == nil {
		t.Fatal("peerExchange returned a response after the request's context ended before any answer")
	}
	select {
	case err := <-served:
		if err == nil {
			t.Fatal("instance A read a clean end of a request whose client went away; want a reset")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("instance A did not see the aborted peer connection within 30s")
	}
}
