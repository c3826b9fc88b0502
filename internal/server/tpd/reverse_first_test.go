package tpd

import (
	"context"
	"io"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A dial with first bytes (what `tp forward` sends for a local client that
// spoke first) to a protected name whose end-to-end state it holds carries them
// sealed in its attach, over both carriers, through a real tpd: the service
// answers them without the dialer writing them again, and the relay never sees
// them in the clear.
func TestReverseProtectedFirstBytes(t *testing.T) {
	t.Parallel()
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			d, url := startDaemon(t, reversePolicy)
			alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
			bob, _, _ := enrollClient(t, d, url, "bob", "phone")
			tap := &capture{}
			startAgent(t, alice, transport, testnet.Upper(t), []string{"bob"}, tap)
			bd, err := bob.Dialer()
			if err != nil {
				t.Fatal(err)
			}
			defer bd.Close()
			bd.Transport = transport
			bd.NoE2EMux = true // session by session, as `tp HOST PORT` dials: the attach path (a carrier has its own tests)
			session := func(first, more string) {
				t.Helper()
				conn, err := bd.DialFirst(context.Background(), "tcp", "svc.rev.tp.internal:22", []byte(first))
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				if _, err := conn.Write([]byte(more)); err != nil {
					t.Fatal(err)
				}
				if err := conn.(wire.Stream).CloseWrite(); err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(conn)
				if want := strings.ToUpper(first + more); err != nil || string(got) != want {
					t.Fatalf("got %q, %v; want %q", got, err, want)
				}
			}
			session("full-handshake-first-", "bytes")     // a TLS handshake: first bytes after the ok
			session("sealed-in-the-attach-", "and-after") // attached: first bytes in the attach
			if full, attached := bd.E2EStats(); full != 1 || attached != 1 {
				t.Fatalf("%d full handshakes and %d attaches; want 1 and 1", full, attached)
			}
			for _, m := range []string{"sealed-in-the-attach-", "SEALED-IN-THE-ATTACH-", "full-handshake-first-"} {
				if tap.contains([]byte(m)) {
					t.Fatalf("the relay forwarded %q in plaintext", m)
				}
			}
		})
	}
}
