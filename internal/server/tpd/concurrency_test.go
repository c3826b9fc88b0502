package tpd

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
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

// sessionBound bounds each session's phases in these tests: far above what
// they take (milliseconds), so that only a hang fails them on a loaded machine.
const sessionBound = time.Minute

// slowMachine lifts tpd's timeouts that these tests do not exercise, which a
// loaded machine under -race can trip when hundreds of sessions start at once.
func slowMachine(c *config.Server) {
	c.PolicyTimeout = 10 * time.Second
	c.HandshakeTimeout = time.Minute
	c.HelloTimeout = time.Minute
}

// openLive opens n sessions with dial, inFlight at a time, and proves each one
// carries a byte both ways through an echo service; they all stay open (closed
// at the end of the test).
func openLive(t *testing.T, n, inFlight int, dial func(context.Context) (net.Conn, error)) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	var g errgroup.Group
	g.SetLimit(inFlight)
	for i := range n {
		g.Go(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), sessionBound)
			defer cancel()
			c, err := dial(ctx)
			if err != nil {
				return fmt.Errorf("session %d: %w", i, err)
			}
			conns[i] = c
			_ = c.SetDeadline(time.Now().Add(sessionBound))
			b := []byte{byte(i)}
			if _, err := c.Write(b); err != nil {
				return fmt.Errorf("session %d: write: %w", i, err)
			}
			if _, err := io.ReadFull(c, b); err != nil || b[0] != byte(i) {
				return fmt.Errorf("session %d: echo of one byte: %q, %v", i, b, err)
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

// echoAll sends size random bytes on every one of conns at once, half-closes,
// and checks that each gets its own bytes back, checksummed.
func echoAll(t *testing.T, conns []net.Conn, size int) {
	t.Helper()
	var g errgroup.Group
	for i, c := range conns {
		_ = c.SetDeadline(time.Now().Add(sessionBound))
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
				return fmt.Errorf("session %d: %w", i, err)
			}
			if sha256.Sum256(got) != want {
				return fmt.Errorf("session %d: echoed %d bytes whose checksum differs from the %d sent", i, len(got), size)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}

func dialVia(dl *clients.Dialer, addr string) func(context.Context) (net.Conn, error) {
	return func(ctx context.Context) (net.Conn, error) { return dl.DialContext(ctx, "tcp", addr) }
}

// Bad input: 250 tunnels open at once through one Dialer over QUIC, against a
// tpd that lets a QUIC connection carry 100 (quic-max-streams 100). Before, the
// 101st waited for a stream to end and failed after 30s; now the Dialer opens
// further QUIC connections, and every tunnel carries its own checksummed data
// while all 250 are open.
func TestQUICTunnelsBeyondStreamLimit(t *testing.T) { // not parallel: its hundreds of sessions at once would starve the other tests
	const n, size = 250, 8 << 10
	d, url := startDaemonCfg(t, allowAliceBob, func(c *config.Server) {
		slowMachine(c)
		c.QUICMaxStreams = 100
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	echo := testnet.Echo(t)
	dl := quicDialer(t, alice)

	conns := openLive(t, n, 50, dialVia(dl, echo))
	if got := dl.QUICConns(); got < 3 {
		t.Fatalf("%d tunnels open at once at 100 streams per connection ride on %d QUIC connections; want at least 3", n, got)
	}
	echoAll(t, conns, size)
}

// Bad input: alice@laptop opens more tunnels over QUIC than tpd allows her
// device (max-sessions-per-identity 25), on connections that carry 10 streams
// each. The further connections carry her 25, and the 26th is the readable
// refusal it is over one connection: too_many_sessions, not a wait.
func TestQUICPoolKeepsIdentityBound(t *testing.T) {
	t.Parallel()
	d, url := startDaemonCfg(t, allowAliceBob, func(c *config.Server) {
		slowMachine(c)
		c.QUICMaxStreams = 10
		c.MaxSessionsPerIdentity = 25
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	echo := testnet.Echo(t)
	dl := quicDialer(t, alice)
	openLive(t, 25, 25, dialVia(dl, echo))
	if got := dl.QUICConns(); got < 3 {
		t.Fatalf("25 tunnels at 10 streams per connection ride on %d QUIC connections; want at least 3", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), sessionBound)
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

// concPolicy lets alice expose the name game publicly on TCP port %[1]d, and bob
// dial it through TP.
const concPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user == "alice"
}

allow if {
	input.action == "expose_public"
	input.identity.user == "alice"
	input.destination.port == %[1]d
}

allow if {
	input.action == "dial"
	input.destination.reverse == "game"
	input.identity.user == "bob"
}
`

// startQUICAgent runs c's agent over QUIC for exposed, allowing the server
// maxSessions sessions at once (0: the default), until the test ends.
func startQUICAgent(t *testing.T, c *clients.Client, exposed []clients.Exposed, maxSessions int) {
	t.Helper()
	d := quicDialer(t, c)
	registered := make(chan struct{}, 10)
	a := &clients.Agent{Dialer: d, Exposed: exposed, Certificate: c.ReverseCertificate, MaxSessions: maxSessions,
		Registered: func([]string) { notify(registered) }, ExitOnRefusal: true}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); waitEnd(t, "the agent", errc, stopBound) })
	select {
	case <-registered:
	case err := <-errc:
		t.Fatalf("agent: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("agent did not register within 30s")
	}
}

// Bad input: 1,100 public clients at once on the TCP port alice's agent
// exposes over QUIC. Before, the agent let tpd open 1,000 streams and the
// 1,001st public client was reset; now (DefaultAgentMaxSessions) all 1,100 are
// served at once and each carries its own checksummed data.
func TestQUICAgentPublicSessionsBeyond1000(t *testing.T) { // not parallel: its hundreds of sessions at once would starve the other tests
	const n, size = 1100, 1 << 10
	port := testnet.FreePort(t, "tcp")
	d, url := startDaemonCfg(t, fmt.Sprintf(concPolicy, port), func(c *config.Server) {
		slowMachine(c)
		c.PublicPorts = strconv.Itoa(port)
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	startQUICAgent(t, alice, []clients.Exposed{{Name: "game", Local: testnet.Echo(t), PublicPort: port}}, 0)
	public := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	conns := openLive(t, n, 64, func(ctx context.Context) (net.Conn, error) {
		var nd net.Dialer
		return nd.DialContext(ctx, "tcp", public)
	})
	echoAll(t, conns, size)
}

// Bad input: one session more than alice's agent allows at once (MaxSessions
// 20). tpd holds it for the pickup timeout (reverse-pickup-timeout, shortened
// here: it is waited out) and then refuses it readably: bob's dial through TP
// gets reverse_busy, and a public client's connection is reset, never left
// hanging; the 20 open sessions are not disturbed.
func TestQUICAgentSessionBoundRefuses(t *testing.T) {
	t.Parallel()
	const max = 20
	port := testnet.FreePort(t, "tcp")
	d, url := startDaemonCfg(t, fmt.Sprintf(concPolicy, port), func(c *config.Server) {
		slowMachine(c)
		c.PublicPorts = strconv.Itoa(port)
		c.ReversePickupTimeout = 3 * time.Second
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	startQUICAgent(t, alice, []clients.Exposed{{Name: "game", Local: testnet.Echo(t), PublicPort: port}}, max)
	public := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	dialPublic := func(ctx context.Context) (net.Conn, error) {
		var nd net.Dialer
		return nd.DialContext(ctx, "tcp", public)
	}
	conns := openLive(t, max, max, dialPublic)

	bd := quicDialer(t, bob)
	var g errgroup.Group
	g.Go(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), sessionBound)
		defer cancel()
		c, err := bd.DialContext(ctx, "tcp", "game.rev.tp.internal:1")
		if err == nil {
			c.Close()
			return errors.New("bob's session beyond the agent's 20 was let through; want reverse_busy")
		}
		var re *clients.RefusedError
		if !errors.As(err, &re) || re.Code != wire.CodeReverseBusy || !strings.Contains(err.Error(), "no room for another session") {
			return fmt.Errorf("bob's session beyond the agent's 20: %v; want the refusal %s", err, wire.CodeReverseBusy)
		}
		return nil
	})
	g.Go(func() error {
		c, err := net.Dial("tcp", public)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(sessionBound))
		n, err := io.Copy(io.Discard, c)
		if !errors.Is(err, syscall.ECONNRESET) {
			return fmt.Errorf("the public client beyond the agent's 20 read %d bytes and then %v; want a connection reset", n, err)
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	echoAll(t, conns, 1<<10)
}

// Bad input: a burst of 200 tunnels at once through one Dialer over TLS, each
// its own TLS connection, against tpd's default max-handshakes-per-ip (128
// unfinished handshakes per source address, beyond which it resets connections
// at accept). The Dialer keeps at most 64 handshakes in flight, so every tunnel
// opens and carries its checksummed data.
func TestTLSTunnelBurstWithinHandshakeBound(t *testing.T) { // not parallel: its hundreds of sessions at once would starve the other tests
	const n = 200
	d, url := startDaemonCfg(t, allowAliceBob, slowMachine)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	echo := testnet.Echo(t)
	dl, err := alice.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	dl.Transport = clients.TransportTLS
	t.Cleanup(func() { dl.Close() })
	conns := openLive(t, n, n, dialVia(dl, echo)) // all at once: more than tpd's 128
	echoAll(t, conns, 1<<10)
}
