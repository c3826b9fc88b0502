package proxy_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// endStream half-closes str and reads the echo's end, so that both directions
// are done and the server's session ends.
func endStream(t *testing.T, str *quic.Stream) {
	t.Helper()
	quicEcho(t, str, "before the end")
	_ = str.Close()
	if _, err := io.ReadAll(str); err != nil {
		t.Fatalf("reading to the end of the stream: %v", err)
	}
}

// fillStreams opens limit requests on c and checks that one more finds no credit.
func fillStreams(t *testing.T, q *quicEnv, c *quic.Conn, limit int) []*quic.Stream {
	t.Helper()
	var open []*quic.Stream
	for range limit {
		open = append(open, rawRequest(t, c, q.echo))
	}
	var limitErr *quic.StreamLimitReachedError
	if _, err := c.OpenStream(); !errors.As(err, &limitErr) {
		t.Fatalf("stream %d: err = %v; want StreamLimitReachedError", limit+1, err)
	}
	return open
}

// TestQUICStreamCreditReturns: tpd returns the stream credit of finished
// requests in batches (an eighth of the limit) or after a delay, not one
// MAX_STREAMS packet per stream. Either way the credit comes back: a client
// that used every stream the connection allows can open new ones once some
// have ended, and a connection carries many times its limit in turn.
func TestQUICStreamCreditReturns(t *testing.T) { // not parallel: it delays the process's stream credit
	const limit = 16 // batches of 2
	deadline := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		t.Cleanup(cancel)
		return ctx
	}

	t.Run("fewer than a batch, after the delay", func(t *testing.T) {
		q := newQUICEnv(t, nil, proxy.QUICOptions{MaxStreams: limit})
		c, err := q.quicConn(t, &q.cert)
		if err != nil {
			t.Fatal(err)
		}
		open := fillStreams(t, q, c, limit)
		endStream(t, open[0]) // one ended: below a batch, so only the delay returns it
		str, err := c.OpenStreamSync(deadline(t))
		if err != nil {
			t.Fatalf("after one stream ended, its credit should come back: %v", err)
		}
		str.CancelWrite(0)
	})

	t.Run("a full batch, at once", func(t *testing.T) {
		// The delay is longer than the test's own deadline: only the batch
		// can return the credit.
		t.Cleanup(proxy.SetStreamCreditDelay(time.Hour))
		q := newQUICEnv(t, nil, proxy.QUICOptions{MaxStreams: limit})
		c, err := q.quicConn(t, &q.cert)
		if err != nil {
			t.Fatal(err)
		}
		open := fillStreams(t, q, c, limit)
		endStream(t, open[0])
		endStream(t, open[1])
		ctx := deadline(t)
		for i := range 2 {
			if _, err := c.OpenStreamSync(ctx); err != nil {
				t.Fatalf("after a batch of 2 streams ended, new stream %d should open: %v", i+1, err)
			}
		}
	})

	t.Run("many times the limit in turn", func(t *testing.T) {
		q := newQUICEnv(t, nil, proxy.QUICOptions{MaxStreams: limit})
		c, err := q.quicConn(t, &q.cert)
		if err != nil {
			t.Fatal(err)
		}
		ctx := deadline(t)
		host, port, _ := net.SplitHostPort(q.echo)
		p, _ := strconv.Atoi(port)
		for i := range 5 * limit {
			str, err := c.OpenStreamSync(ctx) // waits for credit
			if err != nil {
				t.Fatalf("request %d: %v (the credit of finished streams did not come back)", i+1, err)
			}
			_ = str.SetDeadline(time.Now().Add(20 * time.Second))
			if err := wire.WriteClientHello(str, wire.ClientHello{V: 1, Op: "dial", Net: "tcp", Host: host, Port: p}); err != nil {
				t.Fatal(err)
			}
			if sh, err := wire.ReadServerHello(str); err != nil || !sh.OK {
				t.Fatalf("request %d: server hello %+v, %v", i+1, sh, err)
			}
			endStream(t, str)
		}
	})
}
