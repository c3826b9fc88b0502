package tpd

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// lineLog hands each log line of an agent to the test.
type lineLog chan string

func (l lineLog) Write(p []byte) (int, error) {
	select {
	case l <- string(p):
	default: // the test stopped reading; never block the agent
	}
	return len(p), nil
}

// A policy that denies an agent's names is not the end of the agent: it keeps
// retrying with backoff and says why each time, and registers once the policy is
// fixed, without a restart (as a service under systemd needs). The bad input is
// a policy without a listen rule for alice: first before the agent ever
// registered, then again (the live session re-checked and ended) after it did.
func TestReverseAgentRetriesPolicyDenial(t *testing.T) {
	t.Parallel()
	denyAlice := strings.Replace(reversePolicy, `input.identity.user in {"alice", "mallory"}`, `input.identity.user == "mallory"`, 1)
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			d, url := startDaemon(t, denyAlice)
			alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
			setPolicy := func(p string) {
				t.Helper()
				if err := os.WriteFile(filepath.Join(d.cfg.PolicyDir(), "tp.rego"), []byte(p), 0o600); err != nil {
					t.Fatal(err)
				}
				if err := d.ReloadPolicy(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
			dl, err := alice.Dialer()
			if err != nil {
				t.Fatal(err)
			}
			dl.Transport = transport
			lines := make(lineLog, 1000)
			registered := make(chan struct{}, 10)
			a := &clients.Agent{Dialer: dl, Exposed: []clients.Exposed{{Name: "svc", Local: testnet.Upper(t)}},
				AllowUsers: []string{"bob"}, Certificate: alice.ReverseCertificate,
				Logger:     slog.New(slog.NewTextHandler(lines, nil)),
				Registered: func([]string) { notify(registered) }}
			ctx, cancel := context.WithCancel(context.Background())
			var runErr error
			done := make(chan struct{}) // closed when Run returned runErr
			go func() { runErr = a.Run(ctx); dl.Close(); close(done) }()
			t.Cleanup(func() { cancel(); waitEnd(t, "the agent", done, stopBound) })

			// refusals waits for n log lines that say the policy refused the names
			// and that the agent retries, while the agent must not end.
			refusals := func(n int) {
				t.Helper()
				deadline := time.After(60 * time.Second)
				for n > 0 {
					select {
					case l := <-lines:
						if strings.Contains(l, "refused the names; retrying") && strings.Contains(l, "denied by policy") {
							n--
						}
					case <-done:
						t.Fatalf("the agent ended on a policy denial: %v; want it to keep retrying", runErr)
					case <-registered:
						t.Fatal("the agent registered names the policy denies")
					case <-deadline:
						t.Fatal("no refusal logged within 60s")
					}
				}
			}
			waitRegistered := func() {
				t.Helper()
				select {
				case <-registered:
				case <-done:
					t.Fatalf("the agent ended: %v; want it to register once the policy allows it", runErr)
				case <-time.After(60 * time.Second):
					t.Fatal("the agent did not register within 60s of the policy fix")
				}
			}

			refusals(2) // denied from the start: retried, and said so each time
			setPolicy(reversePolicy)
			waitRegistered()
			for len(lines) > 0 { // what came before the fix
				<-lines
			}
			setPolicy(denyAlice) // the re-check ends the live session
			refusals(1)
			setPolicy(reversePolicy)
			waitRegistered()
			got, err := dialReverseAs(t, d, url, []byte("after the fix"))
			if err != nil || string(got) != "AFTER THE FIX" {
				t.Fatalf("a session after the policy fix: %q, %v", got, err)
			}
		})
	}
}

// dialReverseAs enrolls bob and runs one session to svc.
func dialReverseAs(t *testing.T, d *Daemon, url string, msg []byte) ([]byte, error) {
	t.Helper()
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	return dialReverse(bob, clients.TransportTLS, msg)
}

// The same refusal with ExitOnRefusal (tp expose --exit-on-refusal) ends Run with
// the server's reason instead. The bad input is the same policy without a listen
// rule for alice.
func TestReverseAgentExitOnRefusal(t *testing.T) {
	t.Parallel()
	denyAlice := strings.Replace(reversePolicy, `input.identity.user in {"alice", "mallory"}`, `input.identity.user == "mallory"`, 1)
	d, url := startDaemon(t, denyAlice)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	_, err := runAgent(t, alice, clients.TransportTLS, []clients.Exposed{{Name: "svc", Local: testnet.Upper(t)}}, nil)
	if err == nil || !strings.Contains(err.Error(), "denied by policy") {
		t.Fatalf("with ExitOnRefusal: %v; want the policy denial", err)
	}
}

// gate relays loopback TCP connections to target while open; closing it cuts
// the connections it relays and refuses new ones (a network the agent loses).
type gate struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	open   bool
	conns  []net.Conn
}

func newGate(t *testing.T, target string) *gate {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{ln: ln, target: target, open: true}
	t.Cleanup(func() { ln.Close(); g.set(false) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			g.mu.Lock()
			open := g.open
			g.mu.Unlock()
			if !open {
				c.Close()
				continue
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			g.mu.Lock()
			g.conns = append(g.conns, c, up)
			g.mu.Unlock()
			go func() { io.Copy(up, c); up.Close() }()
			go func() { io.Copy(c, up); c.Close() }()
		}
	}()
	return g
}

func (g *gate) addr() string { return g.ln.Addr().String() }

func (g *gate) set(open bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.open = open
	if !open {
		for _, c := range g.conns {
			c.Close()
		}
		g.conns = nil
	}
}

// An agent that lost its name (it was away longer than the grace period and
// another identity took the name) keeps trying, says why, and gets the name back
// once it is free, instead of exiting for good. The bad input is mallory's
// registration of alice's name while alice's agent cannot reach tpd.
func TestReverseAgentRetriesLostName(t *testing.T) {
	t.Parallel()
	d, url := startDaemonCfg(t, reversePolicy, func(c *config.Server) { c.ReverseGrace = time.Second })
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	mallory, _, _ := enrollClient(t, d, url, "mallory", "pc")
	local := testnet.Upper(t)
	dl, err := alice.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	dl.Transport = clients.TransportTLS
	g := newGate(t, dl.Server)
	dl.Server = g.addr() // alice reaches tpd only through the gate
	lines := make(lineLog, 1000)
	registered := make(chan struct{}, 10)
	a := &clients.Agent{Dialer: dl, Exposed: []clients.Exposed{{Name: "svc", Local: local}},
		AllowUsers: []string{"bob"}, Certificate: alice.ReverseCertificate,
		Logger:     slog.New(slog.NewTextHandler(lines, nil)),
		Registered: func([]string) { notify(registered) }}
	ctx, cancel := context.WithCancel(context.Background())
	var runErr error
	done := make(chan struct{})
	go func() { runErr = a.Run(ctx); dl.Close(); close(done) }()
	t.Cleanup(func() { cancel(); waitEnd(t, "the agent", done, stopBound) })
	waitRegistered := func(what string) {
		t.Helper()
		select {
		case <-registered:
		case <-done:
			t.Fatalf("%s: the agent ended: %v", what, runErr)
		case <-time.After(60 * time.Second):
			t.Fatalf("%s: the agent did not register within 60s", what)
		}
	}
	waitRegistered("first registration")

	g.set(false) // alice's agent is cut off; her name is held for 1s, then free
	var stopMallory func()
	deadline := time.Now().Add(30 * time.Second)
	for stopMallory == nil {
		stop, err := runAgent(t, mallory, clients.TransportTLS, []clients.Exposed{{Name: "svc", Local: local}}, nil)
		switch {
		case err == nil:
			stopMallory = stop
		case time.Now().After(deadline):
			t.Fatalf("mallory could not take the free name within 30s: %v", err)
		default:
			time.Sleep(50 * time.Millisecond) // polling for alice's grace to run out, bounded by the deadline
		}
	}
	for len(lines) > 0 {
		<-lines
	}
	g.set(true) // alice's agent is back and finds the name taken
	deadline = time.Now().Add(60 * time.Second)
	for seen := false; !seen; {
		select {
		case l := <-lines:
			seen = strings.Contains(l, "another identity holds a name this agent held; retrying") && strings.Contains(l, "name taken")
		case <-done:
			t.Fatalf("the agent ended on finding its name taken: %v; want it to keep trying", runErr)
		case <-registered:
			t.Fatal("the agent registered a name mallory holds")
		case <-time.After(time.Until(deadline)):
			t.Fatal("the agent logged no retry for its taken name within 60s")
		}
	}
	stopMallory() // mallory unregisters: the name is free again
	waitRegistered("after mallory let the name go")
}
