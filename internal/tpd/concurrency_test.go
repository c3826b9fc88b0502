package tpd

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/config"
	"github.com/tp-proxy/tp/internal/testnet"
	"github.com/tp-proxy/tp/proxy"
)

// quicDialer is a Dialer of c that uses QUIC only.
func quicDialer(t *testing.T, c *clients.Client) *clients.Dialer {
	t.Helper()
	dl, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	dl.Transport = clients.TransportQUIC
	t.Cleanup(func() { dl.Close() })
	return dl
}

// openLive opens n tunnels to echo through dl at once and proves each one
// carries a byte both ways; they stay open (closed at the end of the test).
func openLive(t *testing.T, dl *clients.Dialer, echo string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	var g errgroup.Group
	for i := range n {
		g.Go(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
			defer cancel()
			c, err := dl.DialContext(ctx, "tcp", echo)
			if err != nil {
				return fmt.Errorf("tunnel %d: %w", i, err)
			}
			conns[i] = c
			_ = c.SetDeadline(time.Now().Add(25 * time.Second))
			b := []byte{byte(i)}
			if _, err := c.Write(b); err != nil {
				return fmt.Errorf("tunnel %d: write: %w", i, err)
			}
			if _, err := io.ReadFull(c, b); err != nil || b[0] != byte(i) {
				return fmt.Errorf("tunnel %d: echo of one byte: %q, %v", i, b, err)
			}
			return nil
		})
	}
	err := g.Wait()
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return conns
}

// Bad input: 250 tunnels open at once through one Dialer over QUIC, against a
// tpd that lets a QUIC connection carry 100 (quic-max-streams 100). Before, the
// 101st waited for a stream to end and failed after 30s; now the Dialer opens
// further QUIC connections, and every tunnel carries its own checksummed data
// while all 250 are open.
func TestQUICTunnelsBeyondStreamLimit(t *testing.T) {
	const n, size = 250, 32 << 10
	d, url := startDaemonCfg(t, allowAliceBob, func(c *config.Server) { c.QUICMaxStreams = 100 })
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	echo := testnet.Echo(t)
	dl := quicDialer(t, alice)

	conns := openLive(t, dl, echo, n)
	if got := dl.QUICConns(); got < 3 {
		t.Fatalf("%d tunnels open at once at 100 streams per connection ride on %d QUIC connections; want at least 3", n, got)
	}
	var g errgroup.Group
	for i, c := range conns {
		g.Go(func() error {
			msg := make([]byte, size)
			_, _ = rand.Read(msg)
			want := sha256.Sum256(msg)
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(msg)
				if err == nil {
					err = c.(interface{ CloseWrite() error }).CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(c)
			if err := errors.Join(err, <-werr); err != nil {
				return fmt.Errorf("tunnel %d: %w", i, err)
			}
			if sha256.Sum256(got) != want {
				return fmt.Errorf("tunnel %d: echoed %d bytes whose checksum differs from the %d sent", i, len(got), size)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}

// Bad input: alice@laptop opens more tunnels over QUIC than tpd allows her
// device (max-sessions-per-identity 25), on connections that carry 10 streams
// each. The further connections carry her 25, and the 26th is the readable
// refusal it is over one connection: too_many_sessions, not a wait.
func TestQUICPoolKeepsIdentityBound(t *testing.T) {
	d, url := startDaemonCfg(t, allowAliceBob, func(c *config.Server) {
		c.QUICMaxStreams = 10
		c.MaxSessionsPerIdentity = 25
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	echo := testnet.Echo(t)
	dl := quicDialer(t, alice)
	openLive(t, dl, echo, 25)
	if got := dl.QUICConns(); got < 3 {
		t.Fatalf("25 tunnels at 10 streams per connection ride on %d QUIC connections; want at least 3", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()
	c, err := dl.DialContext(ctx, "tcp", echo)
	if err == nil {
		c.Close()
		t.Fatal("alice's 26th session was let through; want too_many_sessions")
	}
	var re *clients.RefusedError
	if !errors.As(err, &re) || re.Code != proxy.CodeTooManySessions || !strings.Contains(err.Error(), "max-sessions-per-identity") {
		t.Fatalf("alice's 26th session: %v; want the refusal %s naming the setting", err, proxy.CodeTooManySessions)
	}
	if !strings.Contains(err.Error(), "alice@laptop already has 25 sessions open") {
		t.Fatalf("refusal %q does not say how many sessions she holds", err)
	}
}
