package tpd

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// BenchmarkFirstDial is the first connection of a tp process to a server it has
// no cached transport for (a fresh cache each op), with the discovery document
// fetched ("discovery") or not available ("nodoc": its URL is a closed port,
// the race as before discovery). Against a server without QUIC, discovery
// saves the head start; against one with QUIC it costs the fetch:
//
//	go test -run XXX -bench FirstDial -count 5 ./internal/server/tpd/
func BenchmarkFirstDial(b *testing.B) {
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	closedURL := "https://" + closed.Addr().String() + wire.DiscoveryPath
	closed.Close()
	echo := testnet.Echo(b)
	for _, quic := range []bool{false, true} {
		d := serveDaemon(b, allowAlice, func(c *config.Server) { c.QUIC = quic }, nil)
		c, _, _ := enrollClient(b, d, d.cfg.PublicURL(), "alice", "laptop")
		name := "quic-off"
		if quic {
			name = "quic-on"
		}
		for _, mode := range []string{"discovery", "nodoc"} {
			b.Run(name+"/"+mode, func(b *testing.B) {
				dir := b.TempDir()
				for i := 0; b.Loop(); i++ {
					dl, err := c.Dialer()
					if err != nil {
						b.Fatal(err)
					}
					dl.Transport = clients.TransportAuto
					dl.Cache = &clients.TransportCache{Path: filepath.Join(dir, fmt.Sprintf("cache-%d.json", i))}
					if mode == "nodoc" {
						dl.DiscoveryURL = closedURL
					}
					conn, err := dl.DialContext(context.Background(), "tcp", echo)
					if err != nil {
						b.Fatal(err)
					}
					_, _ = conn.Write([]byte("x"))
					_, _ = io.ReadFull(conn, make([]byte, 1))
					conn.Close()
					dl.Close()
				}
			})
		}
	}
}
