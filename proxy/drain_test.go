package proxy_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A QUIC stream opened on a connection that is draining for a shutdown is
// refused at once, with RESET_STREAM refused (0x2), not left without an answer
// until the connection closes (docs/PROTOCOL.md, section 6.3). Bad input: a dial
// on a new stream of a connection whose other session keeps the drain going.
func TestQUICStreamDuringDrainRefused(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	conn, err := q.quicConn(t, &q.cert)
	if err != nil {
		t.Fatal(err)
	}
	held := rawRequest(t, conn, q.echo) // a session that keeps the connection draining
	defer held.CancelRead(0)
	quicEcho(t, held, "before")

	sctx, scancel := context.WithTimeout(context.Background(), time.Minute)
	defer scancel()
	shut := make(chan error, 1)
	go func() { shut <- q.srv.Shutdown(sctx) }()

	// Until the drain has reached this connection its streams are still served;
	// poll with new streams until one is not.
	deadline := time.Now().Add(10 * time.Second)
	for {
		str, err := conn.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		qs := wire.NewQUICStream(conn, str)
		_ = qs.SetDeadline(time.Now().Add(20 * time.Second))
		if err := wire.WriteClientHello(qs, dialHello(t, q.echo)); err != nil {
			t.Fatal(err)
		}
		sh, err := wire.ReadServerHello(qs)
		if err == nil && sh.OK {
			qs.Abort(0) // served before the drain began
			if time.Now().After(deadline) {
				t.Fatal("the server still served new streams 10s after Shutdown began")
			}
			time.Sleep(10 * time.Millisecond) // polling for the drain to begin, bounded by the deadline
			continue
		}
		if err == nil && sh.Code == wire.CodeHelloTimeout {
			// Accepted just before the drain reached the connection, its hello
			// not yet read: refused with a hello that says why. Also a refusal,
			// but not the one this test is about: the next stream is opened
			// during the drain.
			if !strings.Contains(sh.Reason, "shutting down") {
				t.Fatalf("a stream cut while waiting for its hello: %+v; want the reason to say the server is shutting down", sh)
			}
			qs.Abort(0)
			continue
		}
		code, reset := wire.StreamResetCode(err)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			t.Fatal("a stream opened during the drain got no answer")
		case !reset || code != wire.QUICRefused:
			t.Fatalf("a stream opened during the drain: %+v, %v; want RESET_STREAM refused (0x2)", sh, err)
		}
		break
	}
	quicEcho(t, held, "the established session still runs")
	_ = held.Close()
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// A new QUIC connection attempted while the server drains is refused at once with
// CONNECTION_REFUSED, not left unanswered until the client's handshake gives up
// (which is what a closed QUIC listener does: it drops Initial packets). Bad
// input: a fresh QUIC connection to a server whose other session keeps the drain
// going.
func TestQUICConnectionDuringDrainRefused(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	conn, err := q.quicConn(t, &q.cert)
	if err != nil {
		t.Fatal(err)
	}
	held := rawRequest(t, conn, q.echo) // keeps the drain going
	defer held.CancelRead(0)
	quicEcho(t, held, "before")

	sctx, scancel := context.WithTimeout(context.Background(), time.Minute)
	defer scancel()
	shut := make(chan error, 1)
	go func() { shut <- q.srv.Shutdown(sctx) }()

	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := q.quicConn(t, &q.cert) // bounded by its own 10s context
		if err == nil {
			_ = c.CloseWithError(0, "") // accepted before the drain began
			if time.Now().After(deadline) {
				t.Fatal("the server still accepted QUIC connections 10s after Shutdown began")
			}
			time.Sleep(10 * time.Millisecond) // polling for the drain to begin, bounded by the deadline
			continue
		}
		var terr *quic.TransportError
		if !errors.As(err, &terr) || terr.ErrorCode != quic.ConnectionRefused {
			t.Fatalf("a QUIC connection attempted during the drain: %v; want CONNECTION_REFUSED at once", err)
		}
		break
	}
	quicEcho(t, held, "the established session still runs")
	_ = held.Close()
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// A drain held up only by TLS sessions still refuses new QUIC connections with
// CONNECTION_REFUSED. Bad input: a fresh QUIC connection while the server
// drains with no QUIC connection of its own left; before, ServeQUIC returned
// as soon as its own connections were gone and closed the socket, and a new
// QUIC client waited out its handshake timeout instead.
func TestQUICRefusedWhileOnlyTLSSessionsDrain(t *testing.T) {
	log := &testlog.Buffer{}
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Logger = slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}, proxy.QUICOptions{})
	d := q.dialer()
	d.Transport = clients.TransportTLS
	t.Cleanup(func() { d.Close() })
	held := dialVia(t, d, "tcp", q.echo) // a TLS session: the drain waits for it
	_ = held.SetDeadline(time.Now().Add(time.Minute))
	quicEcho(t, held, "before")
	// ServeQUIC runs (newQUICEnv starts it in the background): a handshake
	// answered says so. Shut down before it tracked its listener, it would
	// return at once, and there would be nothing to check.
	probe, err := q.quicConn(t, &q.cert)
	if err != nil {
		t.Fatalf("a QUIC handshake before the shutdown: %v", err)
	}
	_ = probe.CloseWithError(0, "")

	sctx, scancel := context.WithTimeout(context.Background(), time.Minute)
	defer scancel()
	shut := make(chan error, 1)
	go func() { shut <- q.srv.Shutdown(sctx) }()

	// The point where ServeQUIC used to close its socket: its own connections
	// (none) have ended, while the TLS session keeps the drain going.
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(log.String(), "QUIC: every connection ended") {
		if time.Now().After(deadline) {
			t.Fatalf("ServeQUIC did not reach the end of its connections within 20s of Shutdown:\n%s", log.String())
		}
		time.Sleep(10 * time.Millisecond) // polling the log, bounded by the deadline
	}
	_, err = q.quicConn(t, &q.cert) // bounded by its own 10s context
	var terr *quic.TransportError
	if !errors.As(err, &terr) || terr.ErrorCode != quic.ConnectionRefused {
		t.Fatalf("a QUIC connection attempted while only a TLS session drains: %v; want CONNECTION_REFUSED", err)
	}
	quicEcho(t, held, "the TLS session still runs")
	_ = held.Close()
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case err := <-q.quicDone:
		q.quicDone <- err // for the cleanup, which waits for it too
		if !errors.Is(err, proxy.ErrServerClosed) {
			t.Fatalf("ServeQUIC after the drain: %v; want ErrServerClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeQUIC did not return within 10s of the drain's end")
	}
}
