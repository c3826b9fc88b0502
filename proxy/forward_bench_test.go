package proxy_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/proxy"
)

// BenchmarkNewTunnelForward: what tpbench's setup scenario times, in one
// process: a new TCP connection to a running tp forward, one byte each way
// through an echo behind a real Server, close; over a held tp-mux/1
// connection and over a held QUIC connection.
func BenchmarkNewTunnelForward(b *testing.B) {
	for _, transport := range []string{clients.TransportTLS, clients.TransportQUIC} {
		b.Run(transport, func(b *testing.B) {
			var d *clients.Dialer
			var echo string
			if transport == clients.TransportQUIC {
				q := newQUICEnv(b, nil, proxy.QUICOptions{})
				d, echo = q.quicDialer(b), q.echo
			} else {
				e := newEnv(b, nil)
				d, echo = e.dialer(), e.echo
				d.Transport = transport
				defer d.Close()
			}
			ln, err := clients.ListenForward(context.Background(), "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			f := &clients.Forwarder{DialFirst: d.DialFirst, Target: echo, Logger: slog.New(slog.DiscardHandler)}
			served := make(chan struct{})
			go func() { defer close(served); _ = f.Serve(ctx, ln) }()
			defer func() { cancel(); <-served }()
			addr := ln.Addr().String()
			var buf [1]byte
			for b.Loop() {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Write([]byte{'x'}); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf[:]); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}
