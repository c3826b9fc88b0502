package tpd

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// The cost of the peer hop, measured in one run: alice's agent (TLS) serves
// svc on instance A; bob dials it through A ("direct") and through B, which
// carries the session to A over a peer connection ("peer"). session: a new
// dial, one byte each way, close (the new-session time); bulk: 32 MiB up to
// the service through one new session (throughput). Both protected (end to
// end TLS inside), both over TLS carriers, interleaved in one loop so that
// the ratios compare like with like on a shared machine (absolute figures
// there are noisy); the dialer over TLS and over QUIC.
//
//	go test -run '^$' -bench 'PeerHop/session' -benchtime 200x -count 3 ./internal/server/tpd
//	go test -run '^$' -bench 'PeerHop/bulk' -benchtime 20x -count 3 ./internal/server/tpd
func BenchmarkPeerHop(b *testing.B) {
	_, dsn := testpg.NewDatabase(b)
	cfgA := leaseDataDir(b, dsn, nil)
	cfgA.QUIC = true
	a := runDaemon(b, cfgA)
	cfgB := leaseDataDir(b, dsn, &cfgA)
	cfgB.QUIC = true
	pb := runDaemon(b, cfgB)
	svc := testnet.Serve(b, func(c *net.TCPConn) {
		if _, err := io.Copy(io.Discard, c); err == nil {
			_, _ = c.Write([]byte("ok"))
		}
	})
	alice, _, _ := enrollClient(b, a.d, a.url, "alice", "laptop")
	bob, _, _ := enrollClient(b, a.d, a.url, "bob", "phone")
	startAgent(b, alice, clients.TransportTLS, svc, []string{"bob"}, nil)
	one := func(b *testing.B, d *clients.Dialer, payload []byte) {
		conn, err := d.DialContext(context.Background(), "tcp", "svc.rev.tp.internal:22")
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Write(payload); err != nil {
			b.Fatal(err)
		}
		_ = conn.(interface{ CloseWrite() error }).CloseWrite()
		got, err := io.ReadAll(conn)
		if err != nil || string(got) != "ok" {
			b.Fatalf("answer %q %v", got, err)
		}
	}
	bulk := make([]byte, 32<<20)
	// Each iteration runs one direct and one peer operation, alternating which
	// goes first, so that both see the same load on a shared machine.
	pair := func(b *testing.B, direct, peer *clients.Dialer, payload []byte) {
		var td, tp time.Duration
		i := 0
		for b.Loop() {
			for k := range 2 {
				d, t := direct, &td
				if (i+k)%2 == 1 {
					d, t = peer, &tp
				}
				start := time.Now()
				one(b, d, payload)
				*t += time.Since(start)
			}
			i++
		}
		n := float64(i)
		if len(payload) > 1 {
			b.ReportMetric(float64(len(payload))*n/td.Seconds()/1e6, "direct-MB/s")
			b.ReportMetric(float64(len(payload))*n/tp.Seconds()/1e6, "peer-MB/s")
			b.ReportMetric(td.Seconds()/tp.Seconds(), "peer/direct-throughput")
			return
		}
		b.ReportMetric(float64(td.Microseconds())/n, "direct-µs/session")
		b.ReportMetric(float64(tp.Microseconds())/n, "peer-µs/session")
		b.ReportMetric(tp.Seconds()/td.Seconds(), "peer/direct-time")
	}
	// The dialer's carrier: TLS over TCP, and QUIC (the hop between the
	// instances is TLS over TCP either way).
	for _, tr := range []string{clients.TransportTLS, clients.TransportQUIC} {
		direct, err := bob.Dialer()
		if err != nil {
			b.Fatal(err)
		}
		defer direct.Close()
		peer, err := clientOn(b, bob, pb.url).Dialer()
		if err != nil {
			b.Fatal(err)
		}
		defer peer.Close()
		direct.Transport, peer.Transport = tr, tr
		one(b, direct, []byte("w")) // warm: certificate, tickets, the peer pool
		one(b, peer, []byte("w"))
		b.Run("session-"+tr, func(b *testing.B) { pair(b, direct, peer, []byte("x")) })
		b.Run("bulk-"+tr, func(b *testing.B) { pair(b, direct, peer, bulk) })
	}
}
