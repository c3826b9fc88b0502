package tpd

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
)

// BenchmarkConnectBulk compares bulk throughput through one CONNECT tunnel
// (HTTP/1.1, h2, h3 on the proxy name) with a tp/1 tunnel over TLS as `tp
// forward` opens it (and over QUIC, h3's baseline), through the same tpd to the same destination: 1 MiB
// chunks, each answered by one byte. Run the cases interleaved and compare
// medians:
//
//	go test -run XXX -bench ConnectBulk -count 6 ./internal/server/tpd/
func BenchmarkConnectBulk(b *testing.B) {
	r := newConnectRig(b, allowAlice)
	const chunk = 1 << 20
	dest := chunkServer(b, chunk)
	run := func(b *testing.B, w io.Writer, rd io.Reader) {
		buf := make([]byte, chunk)
		ack := make([]byte, 1)
		b.SetBytes(chunk)
		for b.Loop() {
			if _, err := w.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(rd, ack); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("tp-forward-tls", func(b *testing.B) {
		dl, err := r.alice.Dialer()
		if err != nil {
			b.Fatal(err)
		}
		dl.Transport = clients.TransportTLS
		defer dl.Close()
		conn, err := dl.DialContext(context.Background(), "tcp", dest)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		run(b, conn, conn)
	})
	b.Run("tp-forward-quic", func(b *testing.B) {
		dl, err := r.alice.Dialer()
		if err != nil {
			b.Fatal(err)
		}
		dl.Transport = clients.TransportQUIC
		defer dl.Close()
		conn, err := dl.DialContext(context.Background(), "tcp", dest)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		run(b, conn, conn)
	})
	b.Run("connect-http1", func(b *testing.B) {
		resp, c, br := r.connectH1(b, dest)
		if resp.StatusCode != 200 {
			b.Fatal(resp.Status)
		}
		_ = c.SetDeadline(noDeadline)
		run(b, c, br)
	})
	b.Run("connect-h2", func(b *testing.B) {
		pr, pw := io.Pipe()
		defer pw.Close()
		resp := r.h2Connect(b, dest, pr)
		if resp.StatusCode != 200 {
			b.Fatal(resp.Status)
		}
		run(b, pw, resp.Body)
	})
	b.Run("connect-h3", func(b *testing.B) {
		str, resp := r.h3Connect(b, dest)
		if resp.StatusCode != 200 {
			b.Fatal(resp.Status)
		}
		run(b, str, str)
	})
}

var noDeadline time.Time
