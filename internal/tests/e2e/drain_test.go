package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

const drainPolicy = `package tp.authz

default allow := false

allow if input.identity.user == "alice"
`

// TestDrain: SIGTERM to the real tpd while 20 checksummed transfers (half over
// TLS, half over QUIC) are in flight and an agent is registered. Bad input: the
// stop itself, which used to give sessions a fixed 10 s. The transfers, shorter
// than shutdown-timeout, complete with the right checksum; a new TCP connection
// and a new QUIC connection are refused at once during the drain; the agent
// registers with a second tpd started on the same data dir and port while the
// first still drains; the first exits 0 with one line counting what drained and
// what was cut.
func TestDrain(t *testing.T) {
	parallel(t)
	raceTPD(t)
	dataDir := initTPD(t, drainPolicy)
	p1 := startTPD(t, dataDir, stableAddr(t), nil)
	alice := p1.login(t, "alice", "laptop")
	agent := startAgentProc(t, alice, "svc", testnet.Stream(t), "--allow-user", "alice")
	agent.waitRegistered(t)

	const n, chunk, chunks = 20, 16 << 10, 16
	payload := func(i int) []byte { return bytes.Repeat([]byte{byte(i)}, chunk) }
	h := sha256.New()
	for i := range chunks {
		h.Write(payload(i))
	}
	want := [32]byte(h.Sum(nil))
	// The destination sends one chunk, waits until the drain has begun, then
	// sends the rest paced, so that every transfer is in flight during the drain.
	release := make(chan struct{})
	dest := testnet.Serve(t, func(c *net.TCPConn) {
		for i := range chunks {
			if _, err := c.Write(payload(i)); err != nil {
				return
			}
			if i == 0 {
				<-release
			}
			time.Sleep(50 * time.Millisecond) // pacing: the transfer spans part of the drain
		}
	})
	type result struct {
		transport string
		ok        bool
		err       error
	}
	results := make(chan result, n)
	started := make(chan struct{}, n)
	var wg sync.WaitGroup
	for i := range n {
		tr := clients.TransportTLS
		if i%2 == 1 {
			tr = clients.TransportQUIC
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := result{transport: tr}
			defer func() { results <- r }()
			var once sync.Once
			defer once.Do(func() { started <- struct{}{} })
			d, err := clientFor(t, alice).Dialer()
			if err != nil {
				r.err = err
				return
			}
			d.Transport = tr
			defer d.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			c, err := d.DialContext(ctx, "tcp", dest)
			cancel()
			if err != nil {
				r.err = err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			h := sha256.New()
			_, err = io.CopyN(h, c, chunk)
			once.Do(func() { started <- struct{}{} })
			if err == nil {
				_, err = io.Copy(h, c)
			}
			r.ok = err == nil && [32]byte(h.Sum(nil)) == want
			r.err = clients.ExplainCut(context.Background(), err)
		}()
	}
	for range n {
		select {
		case <-started:
		case <-time.After(60 * time.Second):
			t.Fatal("the transfers did not all start within 60s")
		}
	}

	if err := p1.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitLog(t, p1.log, "draining:", 10*time.Second)
	close(release)

	// New connections are refused at once: TCP by the operating system, QUIC
	// with CONNECTION_REFUSED (not a handshake left to time out).
	if c, err := net.DialTimeout("tcp", p1.Addr, 5*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			c.Close()
		}
		t.Errorf("a TCP connection during the drain: %v; want connection refused", err)
	}
	d, err := clientFor(t, alice).Dialer()
	if err != nil {
		t.Fatal(err)
	}
	d.Transport = clients.TransportQUIC
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	c, err := d.DialContext(ctx, "tcp", dest)
	cancel()
	d.Close()
	var terr *quic.TransportError
	if !errors.As(err, &terr) || terr.ErrorCode != quic.ConnectionRefused {
		if c != nil {
			c.Close()
		}
		t.Errorf("a QUIC connection during the drain: %v; want CONNECTION_REFUSED", err)
	}

	// A second tpd on the same data dir takes the port (TCP only: the first
	// still refuses on UDP); the agent, told to reconnect, finds it.
	p2 := startTPD(t, dataDir, p1.Addr, []string{"TP_QUIC=false"})
	agent.waitRegistered(t)

	wg.Wait()
	close(results)
	for r := range results {
		if !r.ok {
			t.Errorf("a %s transfer shorter than shutdown-timeout did not complete with the right checksum: %v", r.transport, r.err)
		}
	}
	select {
	case <-p1.done:
	case <-time.After(60 * time.Second):
		t.Fatal("the first tpd did not exit within 60s of SIGTERM")
	}
	if code := p1.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("the drained tpd exited with %d; want 0", code)
	}
	m := regexp.MustCompile(`msg=stopped drained=(\d+) cut=(\d+) forced=false took=`).FindStringSubmatch(p1.log.String())
	if m == nil {
		t.Fatalf("no stopped line with drained and cut counts:\n%s", p1.log.String())
	}
	if drained, _ := strconv.Atoi(m[1]); drained < n || m[2] != "0" {
		t.Errorf("stopped line says drained=%s cut=%s; want at least %d drained and none cut", m[1], m[2], n)
	}
	// The agent reconnected without a backoff wait, having understood the stop.
	if !regexp.MustCompile(`control session ended; reconnecting" err="[^"]*(stopping|shutting down)[^"]*" in=0s`).MatchString(agent.log.String()) {
		t.Errorf("the agent did not reconnect at once on the server's stop:\n%s", agent.log.String())
	}
	// tp prints its registration when it reads the ok, which may be before tpd
	// logs it.
	waitLog(t, p2.log, `msg="reverse listener registered" identity=alice@laptop names=svc`, 20*time.Second)
}

// TestDrainAgentFollowsStopDuringCertificateOrder: tp expose registers, then
// orders its protected name's certificate from TP's HTTPS API, and the server
// stops while that order is under way. Bad input: the HTTPS API answers
// nothing (the agent reaches tpd through a relay that carries its QUIC
// packets but accepts TCP connections and holds them), so the order hangs.
// The agent must still follow the stop (reconnect at once) while the order
// hangs: the order used to run on the agent's own goroutine and hold its
// control session, so an agent that registered just before a drain reached
// the next tpd only when the order gave up, a minute later (TestDrain's
// second registration, under load).
func TestDrainAgentFollowsStopDuringCertificateOrder(t *testing.T) {
	parallel(t)
	raceTPD(t)
	p1 := startTPD(t, initTPD(t, drainPolicy), "127.0.0.1:0", nil)
	alice := p1.login(t, "alice", "laptop")
	relay := startCarrierRelay(t, p1.Addr, true, true)
	relay.stallTCP()
	env := append(copyHome(t, alice, withHost(t, p1.URL, relay.Addr)), carrierEnv(wire.CarrierUDP)...)
	agent := startAgentProc(t, env, "svc", testnet.Stream(t), "--allow-user", "alice")
	agent.waitRegistered(t)
	waitFor(t, 30*time.Second, "the agent to begin its certificate order (a TCP connection to the relay)", func() bool {
		return relay.stalled() > 0
	})

	if err := p1.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The order gives up after 60 s at most (30 s per request): 90 s lets an
	// agent that waits for it show that it did, below.
	reconnect := regexp.MustCompile(`control session ended; reconnecting" err="[^"]*(stopping|shutting down)[^"]*" in=0s`)
	waitFor(t, 90*time.Second, "the agent to reconnect on the server's stop", func() bool {
		return reconnect.MatchString(agent.log.String())
	})
	log := agent.log.String()
	if strings.Contains(log[:reconnect.FindStringIndex(log)[0]], "getting a certificate") {
		t.Fatalf("the agent followed the server's stop only after its certificate order gave up:\n%s", log)
	}
}
