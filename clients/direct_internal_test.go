package clients

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// onLoopback keeps a pair's ICE on loopback: nothing leaves the host.
func onLoopback(d *Dialer) {
	d.DirectLoopback = true
	d.DirectInterfaces = func(name string) bool { return name == "lo" }
}

func echoService(t *testing.T) string {
	return testnet.Serve(t, func(c *net.TCPConn) {
		_, _ = io.Copy(c, c)
		_ = c.CloseWrite()
	})
}

// directEnv is a real proxy.Server over TLS, alice's agent for svc.rev.test
// (bob allowed) in front of an echo service, and bob's Dialer with direct paths.
func directEnv(t *testing.T, edit func(*Agent)) (*Dialer, *Agent) {
	t.Helper()
	var agent *Agent
	addr, cfg := startReverseServerWith(t, echoService(t), func(a *Agent) {
		onLoopback(a.Dialer)
		if edit != nil {
			edit(a)
		}
		agent = a
	})
	d := &Dialer{Server: addr, TLSConfig: cfg, Transport: TransportTLS, Direct: true}
	onLoopback(d)
	t.Cleanup(func() { _ = d.Close() })
	return d, agent
}

const directAddr = "svc.rev.test:22"

// The first session to a protected name opens the pair through the server;
// it moves to the direct path, and later sessions are streams of it: every
// byte comes back as sent, and the relay carries next to nothing.
func TestDirectSessions(t *testing.T) {
	d, _ := directEnv(t, nil)
	c, err := d.DialContext(context.Background(), "tcp", directAddr)
	if err != nil {
		t.Fatal(err)
	}
	if err := checksummed(c, 1<<20); err != nil {
		t.Fatalf("the first session: %v", err)
	}
	p := d.DirectPath(directAddr)
	if p == nil {
		t.Fatal("the Dialer holds no pair after the first session")
	}
	waitUntil(t, "the pair sends full-size packets on the direct path", func() bool { return p.Direct() && p.Stats().LargeDirect })
	before := p.Stats()
	for i := range 4 {
		c, err := d.DialContext(context.Background(), "tcp", directAddr)
		if err != nil {
			t.Fatalf("session %d: %v", i+2, err)
		}
		if err := checksummed(c, 4<<20); err != nil {
			t.Fatalf("session %d: %v", i+2, err)
		}
	}
	if opened, _ := d.DirectStats(); opened != 1 {
		t.Fatalf("%d pairs opened for five sessions; want 1", opened)
	}
	after := p.Stats()
	if relayed := after.RelayOut - before.RelayOut; relayed > (after.DirectOut-before.DirectOut)/100 {
		t.Fatalf("the relay carried %d packets of the later sessions against %d direct: %+v", relayed, after.DirectOut-before.DirectOut, after)
	}
}

// An agent that takes no direct path answers so; the dialer's session goes on
// as an ordinary protected one, and later ones do not ask again.
func TestDirectRefusedByTheAgent(t *testing.T) {
	d, _ := directEnv(t, func(a *Agent) { a.NoDirect = true })
	for i := range 2 {
		c, err := d.DialContext(context.Background(), "tcp", directAddr)
		if err != nil {
			t.Fatalf("session %d: %v", i+1, err)
		}
		if err := checksummed(c, 256<<10); err != nil {
			t.Fatalf("session %d: %v", i+1, err)
		}
	}
	if opened, _ := d.DirectStats(); opened != 0 || d.DirectPath(directAddr) != nil {
		t.Fatalf("%d pairs opened with an agent that takes none", opened)
	}
}

// Each stream of a pair is a session the agent checks against its allow list
// as it is then: once bob is no longer allowed, his next session on the same
// pair is refused with the agent's reason.
func TestDirectChecksEachStream(t *testing.T) {
	d, a := directEnv(t, nil)
	c, err := d.DialContext(context.Background(), "tcp", directAddr)
	if err != nil {
		t.Fatal(err)
	}
	if err := checksummed(c, 1024); err != nil {
		t.Fatal(err)
	}
	a.SetAllow([]string{"carol"}, nil)
	_, err = d.DialContext(context.Background(), "tcp", directAddr)
	var re *RefusedError
	if !errors.As(err, &re) || re.Code != CodeAgentDenied {
		t.Fatalf("a session after bob left the allow list: %v; want the agent's refusal", err)
	}
	if opened, _ := d.DirectStats(); opened != 1 {
		t.Fatalf("%d pairs opened; want the refusal on the same pair", opened)
	}
}

// A session on a pair whose relay is cut fails with an error, never an end
// of stream: the server's consent ended.
func TestDirectCutIsError(t *testing.T) {
	d, _ := directEnv(t, nil)
	c, err := d.DialContext(context.Background(), "tcp", directAddr)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the pair sends on the direct path", d.DirectPath(directAddr).Direct)
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	d.transport().Close() // the Dialer's TLS connections to the server, the relay among them
	_, err = io.ReadAll(c)
	if err == nil {
		t.Fatal("the session read a clean end after its relay was cut")
	}
	if _, ok := c.(wire.Stream); !ok {
		t.Fatalf("a session is a %T, not a wire.Stream", c)
	}
}

// A pair whose ICE found no direct path (no interface gives candidates here)
// takes no further session: the next ones are ordinary protected sessions
// (faster than QUIC inside the relayed stream), and the name gets no new pair
// for a while.
func TestDirectNoPathFallsBack(t *testing.T) {
	d, _ := directEnv(t, nil)
	d.DirectInterfaces = func(string) bool { return false }
	c, err := d.DialContext(context.Background(), "tcp", directAddr)
	if err != nil {
		t.Fatal(err)
	}
	if err := checksummed(c, 64<<10); err != nil {
		t.Fatal(err)
	}
	d.direct.mu.Lock()
	dp := d.direct.pairs[directAddr]
	d.direct.mu.Unlock()
	if dp == nil {
		t.Fatal("the first session opened no pair")
	}
	waitUntil(t, "ICE gives up", func() bool { return dp.p.ICEErr() != nil })
	for i := range 2 {
		c, err := d.DialContext(context.Background(), "tcp", directAddr)
		if err != nil {
			t.Fatalf("session %d after ICE gave up: %v", i+2, err)
		}
		if err := checksummed(c, 64<<10); err != nil {
			t.Fatal(err)
		}
	}
	if opened, _ := d.DirectStats(); opened != 1 || d.DirectPath(directAddr) != nil {
		t.Fatalf("%d pairs opened, and one held: %v; want the later sessions without a pair", opened, d.DirectPath(directAddr) != nil)
	}
}

// An agent serves a bounded number of pairs to one dialer device: beyond it
// (1 here, 16 by default) it refuses the pair, and the dialer's session goes
// on through the server, intact. Once the pair ends, its place is free again.
func TestDirectPairsPerDeviceBounded(t *testing.T) {
	d1, a := directEnv(t, func(a *Agent) { a.pairs.perCap = 1 })
	second := func() *Dialer {
		d := &Dialer{Server: d1.Server, TLSConfig: d1.TLSConfig, Transport: d1.Transport, Direct: true}
		onLoopback(d)
		t.Cleanup(func() { _ = d.Close() })
		return d
	}
	for i, d := range []*Dialer{d1, second()} {
		c, err := d.DialContext(context.Background(), "tcp", directAddr)
		if err != nil {
			t.Fatalf("dialer %d: %v", i+1, err)
		}
		if err := checksummed(c, 256<<10); err != nil {
			t.Fatalf("dialer %d: %v", i+1, err)
		}
		if opened, _ := d.DirectStats(); opened != 1-i {
			t.Fatalf("dialer %d of the same device opened %d pairs; want %d (one pair per device here)", i+1, opened, 1-i)
		}
	}
	_ = d1.Close()
	waitUntil(t, "the agent frees the first dialer's place", func() bool {
		a.pairs.mu.Lock()
		defer a.pairs.mu.Unlock()
		return a.pairs.total == 0
	})
	d3 := second()
	c, err := d3.DialContext(context.Background(), "tcp", directAddr)
	if err != nil {
		t.Fatal(err)
	}
	if err := checksummed(c, 1024); err != nil {
		t.Fatal(err)
	}
	if opened, _ := d3.DirectStats(); opened != 1 {
		t.Fatalf("a dialer after the pair ended opened %d pairs; want 1", opened)
	}
}

// Bad input: an allowed dialer opens streams of its pair and resets each
// before a byte (a rapid reset), up to 3×cancelFlood times. Past cancelFlood
// more aborted than answered the agent ends the pair, says why in its log,
// and the dialer's next session goes on without it.
func TestDirectRapidResetEndsThePair(t *testing.T) {
	var logs testlog.Buffer
	d, _ := directEnv(t, func(a *Agent) { a.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	c, err := d.DialContext(context.Background(), "tcp", directAddr)
	if err != nil {
		t.Fatal(err)
	}
	if err := checksummed(c, 1024); err != nil {
		t.Fatal(err)
	}
	d.direct.mu.Lock()
	var dp *directPair
	for _, p := range d.direct.pairs {
		dp = p
	}
	d.direct.mu.Unlock()
	if dp == nil {
		t.Fatal("the dialer holds no pair after its first session")
	}
	opened := 0
	for range 3 * cancelFlood {
		s, err := dp.p.Conn.OpenStreamSync(context.Background())
		if err != nil {
			break // the agent ended the pair
		}
		opened++
		s.CancelWrite(0)
		s.CancelRead(0)
	}
	select {
	case <-dp.p.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("the pair still runs after %d streams reset before their first byte", opened)
	}
	if !strings.Contains(logs.String(), "rapid reset") {
		t.Fatalf("the agent did not say why it ended the pair:\n%s", logs.String())
	}
	// The next session: no pair (it ended), an ordinary one or a new pair.
	c, err = d.DialContext(context.Background(), "tcp", directAddr)
	if err != nil {
		t.Fatalf("a session after the flood: %v", err)
	}
	if err := checksummed(c, 1024); err != nil {
		t.Fatalf("a session after the flood: %v", err)
	}
}
