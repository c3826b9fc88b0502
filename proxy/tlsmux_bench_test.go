package proxy_test

import (
	"context"
	"testing"

	"github.com/tp-proxy/tp/clients"
)

// BenchmarkThroughputTLSMux: one tunnel's bulk over TLS, as a stream of a
// tp-mux/1 connection and as a TLS connection of its own, to a sink through a
// real Server in this process. Figures: the ratio of the two in one run.
func BenchmarkThroughputTLSMux(b *testing.B) {
	for _, mode := range []string{"conn", "mux"} {
		b.Run(mode, func(b *testing.B) {
			e := newEnv(b, nil)
			addr, counts := startSink(b)
			d := e.dialer()
			d.Transport, d.NoTLSMux = clients.TransportTLS, mode == "conn"
			defer d.Close()
			c, err := d.DialContext(context.Background(), "tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			benchThroughput(b, c, counts)
		})
	}
}

// BenchmarkNewTunnelTLSMux: a new tunnel over TLS (dial, one byte each way
// through an echo, close), as a stream of a held tp-mux/1 connection and as a
// TLS connection of its own. Figures: the ratio of the two in one run.
func BenchmarkNewTunnelTLSMux(b *testing.B) {
	for _, mode := range []string{"conn", "mux"} {
		b.Run(mode, func(b *testing.B) {
			e := newEnv(b, nil)
			d := e.dialer()
			d.Transport, d.NoTLSMux = clients.TransportTLS, mode == "conn"
			defer d.Close()
			for b.Loop() {
				c, err := d.DialContext(context.Background(), "tcp", e.echo)
				if err != nil {
					b.Fatal(err)
				}
				oneByteEachWay(b, c)
			}
		})
	}
}

// BenchmarkDownloadTLSMux: one tunnel's bulk from the destination to the
// client (a download: the server writes the stream), as a stream of a tp-mux/1
// connection and as a TLS connection of its own. Figures: the ratio of the
// two in one run.
func BenchmarkDownloadTLSMux(b *testing.B) {
	for _, mode := range []string{"conn", "mux"} {
		b.Run(mode, func(b *testing.B) {
			e := newEnv(b, nil)
			src := startSource(b)
			d := e.dialer()
			d.Transport, d.NoTLSMux = clients.TransportTLS, mode == "conn"
			defer d.Close()
			c, err := d.DialContext(context.Background(), "tcp", src)
			if err != nil {
				b.Fatal(err)
			}
			benchDownload(b, c)
		})
	}
}
