package proxy_test

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// BenchmarkBrowserRequest: a new request of a browser's, spoken by a Go
// client without a browser, as the server sees it (ns/op is one request:
// its set-up, then one byte to an echo and back): a stream of an open
// WebTransport session, and a WebSocket of its own (a TCP connection, a TLS
// handshake, the upgrade and a fresh proof each time).
//
//	go test -run '^$' -bench BrowserRequest -benchtime 200x ./proxy/
func BenchmarkBrowserRequest(b *testing.B) {
	b.Run("webtransport", func(b *testing.B) {
		q := newQUICEnv(b, func(c *proxy.Config) { c.WebTransport = true }, proxy.QUICOptions{})
		s := openWT(b, q, wtProof(b, q.cert, "localhost", time.Now()))
		one := []byte{42}
		for b.Loop() {
			str := s.stream(b, dialHello(b, q.echo))
			if sh, err := wire.ReadServerHello(str); err != nil || !sh.OK {
				b.Fatalf("%+v %v", sh, err)
			}
			if _, err := str.Write(one); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(str, make([]byte, 1)); err != nil {
				b.Fatal(err)
			}
			_ = str.Close()
			str.CancelRead(0)
		}
	})
	b.Run("websocket", func(b *testing.B) {
		q := newQUICEnv(b, func(c *proxy.Config) { c.WebTransport = true }, proxy.QUICOptions{})
		var hello bytes.Buffer
		_ = wire.WriteClientHello(&hello, dialHello(b, q.echo))
		ctx := context.Background()
		for b.Loop() {
			c := openWS(b, q, wtProof(b, q.cert, wsAuthority(q), time.Now()))
			if err := c.Write(ctx, websocket.MessageBinary, hello.Bytes()); err != nil {
				b.Fatal(err)
			}
			if _, _, err := c.Read(ctx); err != nil { // the server hello
				b.Fatal(err)
			}
			if err := c.Write(ctx, websocket.MessageBinary, []byte{42}); err != nil {
				b.Fatal(err)
			}
			if _, _, err := c.Read(ctx); err != nil {
				b.Fatal(err)
			}
			_ = c.CloseNow()
		}
	})
}
