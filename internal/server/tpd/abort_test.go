package tpd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

func nextConn(t *testing.T, conns <-chan *net.TCPConn) *net.TCPConn {
	t.Helper()
	select {
	case c := <-conns:
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		return c
	case <-time.After(30 * time.Second):
		t.Fatal("the local service got no connection within 30s")
		return nil
	}
}

// wantReset reads c to its end and fails unless it ended with a connection reset.
func wantReset(t *testing.T, who string, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, err := io.Copy(io.Discard, c)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		t.Fatalf("%s read %d bytes and then nothing for 30s: the reset was not passed on", who, n)
	case !errors.Is(err, syscall.ECONNRESET):
		t.Fatalf("%s read %d bytes and then %v; want a connection reset, not a clean end", who, n, err)
	}
}

func resetTCP(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}

// TestReverseResetsPassOn: a reset on either end of a reverse session reaches the
// other end as a reset, in protected and public mode, over QUIC and TLS. Bad
// input: each end's RST in the middle of a transfer.
func TestReverseResetsPassOn(t *testing.T) {
	t.Parallel()
	port := testnet.FreePort(t, "tcp")
	policy := reversePolicy + fmt.Sprintf(`
allow if {
	input.action == "expose_public"
	input.identity.user == "alice"
	input.destination.port == %d
}
`, port)
	d, url := startDaemonCfg(t, policy, func(c *config.Server) { c.PublicPorts = strconv.Itoa(port) })
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	local, conns := testnet.Accept(t)
	public := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	data := bytes.Repeat([]byte("r"), 64<<10)
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			_, err := runAgent(t, alice, transport, []clients.Exposed{
				{Name: "svc", Local: local},
				{Name: "game", Local: local, PublicPort: port},
			}, nil)
			if err != nil {
				t.Fatal(err)
			}
			bd, err := bob.Dialer()
			if err != nil {
				t.Fatal(err)
			}
			bd.Transport = transport
			defer bd.Close()
			dial := func() net.Conn {
				t.Helper()
				c, err := bd.DialContext(context.Background(), "tcp", "svc.rev.tp.internal:22")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				return c
			}

			t.Run("protected/service resets", func(t *testing.T) {
				c := dial()
				svc := nextConn(t, conns)
				svc.Write(data)
				resetTCP(svc)
				_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
				_, err := io.Copy(io.Discard, c)
				var ce *clients.CutError
				if !errors.As(err, &ce) {
					t.Fatalf("the dialer read %v (%T) after the service's reset; want a *clients.CutError", err, err)
				}
				clients.ExplainCut(context.Background(), err)
				if ce.End == nil || ce.End.By != "agent" {
					t.Fatalf("explained as %q; want the exposed service's side named", err)
				}
			})
			t.Run("protected/dialer resets", func(t *testing.T) {
				c := dial()
				svc := nextConn(t, conns)
				if _, err := c.Write(data); err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(svc, make([]byte, len(data))); err != nil {
					t.Fatal(err)
				}
				wire.Abort(c, wire.QUICPeerReset)
				wantReset(t, "the local service", svc)
			})
			t.Run("public/client resets", func(t *testing.T) {
				c, err := net.Dial("tcp", public)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				c.Write(data)
				svc := nextConn(t, conns)
				if _, err := io.ReadFull(svc, make([]byte, len(data))); err != nil {
					t.Fatal(err)
				}
				resetTCP(c.(*net.TCPConn))
				wantReset(t, "the local service", svc)
			})
			t.Run("public/service resets", func(t *testing.T) {
				c, err := net.Dial("tcp", public)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				c.Write([]byte("x")) // the agent's session starts with the first byte over QUIC
				svc := nextConn(t, conns)
				svc.Write(data)
				resetTCP(svc)
				wantReset(t, "the public client", c)
			})
		})
	}
}
