package tpd

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// TestCarriersThroughTpd: a real tpd serves tp/1's QUIC connection over every
// carrier (tls on the shared port's ALPN, ws and http on its website side), to
// an enrolled device's Dialer, and its discovery document lists them.
func TestCarriersThroughTpd(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, allowAlice)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	upper := testnet.Upper(t)
	for _, carrier := range []string{wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP} {
		t.Run(carrier, func(t *testing.T) {
			dl, err := alice.Dialer()
			if err != nil {
				t.Fatal(err)
			}
			dl.Carrier = carrier
			defer dl.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := dl.DialContext(ctx, "tcp", upper)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			msg := "over the " + carrier + " carrier"
			_, _ = io.WriteString(c, msg)
			_ = c.(interface{ CloseWrite() error }).CloseWrite()
			got, err := io.ReadAll(c)
			if err != nil || string(got) != strings.ToUpper(msg) {
				t.Fatalf("reply %q (%v)", got, err)
			}
			if n := d.proxy.CarrierSessions(); n == 0 {
				t.Fatalf("tpd has no %s carrier session: the dial did not ride the carrier", carrier)
			}
		})
	}
	dl, err := alice.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	defer dl.Close()
	doc, err := clients.FetchDiscovery(context.Background(), url+wire.DiscoveryPath, dl.TLSConfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{wire.DiscoverCarrierTLS, wire.DiscoverCarrierWS, wire.DiscoverCarrierHTTP} {
		if _, ok := doc.Find(name); !ok {
			t.Errorf("the discovery document does not list %s: %+v", name, doc.Transports)
		}
	}
}
