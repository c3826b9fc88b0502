package tpd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Later protected sessions of one dialer attach to the end-to-end state of its
// first (docs/PROTOCOL.md, section 11.4) over both carriers, yet every session
// is still a dial of its own at tpd: its own stream to the agent, the policy
// asked each time (bob refused once the policy drops him, though his state is
// there), and a revoked device refused. The relay sees no plaintext of any.
func TestReverseProtectedAttach(t *testing.T) {
	t.Parallel()
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			d, url := startDaemon(t, reversePolicy)
			alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
			bob, _, _ := enrollClient(t, d, url, "bob", "phone")
			setPolicy := func(p string) {
				t.Helper()
				if err := os.WriteFile(filepath.Join(d.cfg.PolicyDir(), "tp.rego"), []byte(p), 0o600); err != nil {
					t.Fatal(err)
				}
				if err := d.ReloadPolicy(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
			tap := &capture{}
			startAgent(t, alice, transport, testnet.Upper(t), []string{"bob"}, tap)
			bd, err := bob.Dialer()
			if err != nil {
				t.Fatal(err)
			}
			defer bd.Close()
			bd.Transport = transport
			bd.NoE2EMux = true // session by session, as `tp HOST PORT` dials: the attach path (a carrier has its own tests)
			session := func(marker string) error {
				conn, err := bd.DialContext(context.Background(), "tcp", "svc.rev.tp.internal:22")
				if err != nil {
					return err
				}
				defer conn.Close()
				if _, err := conn.Write([]byte(marker)); err != nil {
					return err
				}
				if err := conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
					return err
				}
				got, err := io.ReadAll(conn)
				if err == nil && string(got) != strings.ToUpper(marker) {
					t.Fatalf("got %q for %q", got, marker)
				}
				return err
			}
			streams := func() int { tap.mu.Lock(); defer tap.mu.Unlock(); return len(tap.raw) }

			markers := []string{"attach-marker-one-" + transport, "attach-marker-two-" + transport, "attach-marker-three-" + transport}
			for _, m := range markers {
				if err := session(m); err != nil {
					t.Fatalf("%s: %v", m, err)
				}
			}
			if full, attached := bd.E2EStats(); full != 1 || attached != 2 {
				t.Fatalf("%d full handshakes and %d attaches for 3 sessions; want 1 and 2", full, attached)
			}
			if n := streams(); n != 3 {
				t.Fatalf("the agent got %d streams for 3 sessions; want one each", n)
			}
			for _, m := range markers {
				if tap.contains([]byte(m)) || tap.contains(bytes.ToUpper([]byte(m))) {
					t.Fatalf("the relay forwarded %q in plaintext", m)
				}
			}

			// The policy no longer lets bob dial svc: refused at tpd, before the agent.
			setPolicy(strings.Replace(reversePolicy, `input.identity.user in {"bob", "dave"}`, `input.identity.user == "dave"`, 1))
			var re *clients.RefusedError
			if err := session("refused"); !errors.As(err, &re) || re.Code != wire.CodePolicyDenied {
				t.Fatalf("bob after the policy dropped him: %v; want %s", err, wire.CodePolicyDenied)
			}
			setPolicy(reversePolicy)
			if err := session("allowed-again"); err != nil {
				t.Fatalf("bob after the policy took him back: %v", err)
			}
			if _, attached := bd.E2EStats(); attached != 3 {
				t.Fatalf("%d attaches; want the session after the refusal attached too (3)", attached)
			}

			// A revoked device reaches nothing, whatever state it holds.
			before := streams()
			if _, err := d.Revoke(context.Background(), "device", "bob@phone", false); err != nil {
				t.Fatal(err)
			}
			if err := session("revoked"); err == nil {
				t.Fatal("a revoked device's session went through")
			}
			if n := streams(); n != before {
				t.Fatalf("the agent got %d new streams for a revoked device; want none", n-before)
			}
		})
	}
}
