package proxy_test

import (
	"context"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/proxy"
)

// BenchmarkThroughputQUICProxy is BenchmarkThroughputTLSProxy over one QUIC stream.
func BenchmarkThroughputQUICProxy(b *testing.B) {
	q := newQUICEnv(b, nil, proxy.QUICOptions{})
	addr, counts := startSink(b)
	d := q.quicDialer(b)
	c, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	benchThroughput(b, c, counts)
}

// BenchmarkNewStreamQUIC: a new tunnelled connection (1 byte each way) on an
// already open QUIC connection; compare BenchmarkNewConnProxy (a new TLS connection).
func BenchmarkNewStreamQUIC(b *testing.B) {
	q := newQUICEnv(b, nil, proxy.QUICOptions{})
	d := q.quicDialer(b)
	d.Transport = clients.TransportQUIC
	warm, err := d.DialContext(context.Background(), "tcp", q.echo) // opens the connection
	if err != nil {
		b.Fatal(err)
	}
	warm.Close()
	for b.Loop() {
		c, err := d.DialContext(context.Background(), "tcp", q.echo)
		if err != nil {
			b.Fatal(err)
		}
		oneByteEachWay(b, c)
	}
}
