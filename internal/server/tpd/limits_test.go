package tpd

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
)

const allowAliceBob = `package tp.authz

default allow := false

allow if input.identity.user in {"alice", "bob"}
`

// poll waits up to 30s for cond.
func poll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 30s", what)
		}
		<-tick.C
	}
}

// Failure mode, bad input: alice@laptop runs into the per-identity bounds of a
// real tpd (max-sessions-per-identity 3, max-reverse-names-per-identity 2, as
// set in the configuration) with real enrolled clients and agents, on both
// transports, while bob@phone works as if she were not there. Her refusals
// say what to do; when she ends sessions or stops an agent she is served again,
// and her refused agent registers on its own once the names are free.
func TestIdentityCapsHold(t *testing.T) {
	t.Parallel()
	d, url := startDaemonCfg(t, allowAliceBob, func(c *config.Server) {
		c.MaxSessionsPerIdentity = 3
		c.MaxReverseNamesPerIdentity = 2
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	echo := testnet.Echo(t)
	transports := []string{clients.TransportTLS, clients.TransportQUIC}
	dialer := func(c *clients.Client, transport string) *clients.Dialer {
		dl, err := c.Dialer()
		if err != nil {
			t.Fatal(err)
		}
		dl.Transport = transport
		t.Cleanup(func() { dl.Close() })
		return dl
	}
	open := func(c *clients.Client, transport string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		conn, err := dialer(c, transport).DialContext(ctx, "tcp", echo)
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { conn.Close() })
		_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
		b := []byte("x")
		if _, err := conn.Write(b); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(conn, b); err != nil {
			t.Fatal(err)
		}
		return conn, nil
	}
	mustOpen := func(c *clients.Client, transport string) net.Conn {
		t.Helper()
		conn, err := open(c, transport)
		if err != nil {
			t.Fatalf("%s: %v", transport, err)
		}
		return conn
	}
	tooMany := func(err error, code string) bool {
		var re *clients.RefusedError
		return errors.As(err, &re) && re.Code == code
	}

	var mine []net.Conn
	for i := range 3 {
		mine = append(mine, mustOpen(alice, transports[i%2]))
	}
	for _, tr := range transports {
		_, err := open(alice, tr)
		if !tooMany(err, proxy.CodeTooManySessions) || !strings.Contains(err.Error(), "alice@laptop already has 3 sessions open") || !strings.Contains(err.Error(), "max-sessions-per-identity") {
			t.Fatalf("alice's 4th session over %s: %v; want %s naming her and the setting", tr, err, proxy.CodeTooManySessions)
		}
	}
	var bobs []net.Conn
	for i := range 3 {
		bobs = append(bobs, mustOpen(bob, transports[i%2]))
	}
	mine[0].Close()
	poll(t, "alice served again after closing a session", func() bool {
		conn, err := open(alice, clients.TransportQUIC)
		if err != nil && !tooMany(err, proxy.CodeTooManySessions) {
			t.Fatal(err)
		}
		if err == nil {
			mine[0] = conn
		}
		return err == nil
	})
	for _, c := range append(mine, bobs...) { // control sessions count as sessions too
		c.Close()
	}

	// Names: alice's first agent holds two, her second agent's name is one too
	// many; bob registers his meanwhile.
	agent := func(c *clients.Client, transport string, log io.Writer, names ...string) (registered chan struct{}, stop func()) {
		var exposed []clients.Exposed
		for _, n := range names {
			exposed = append(exposed, clients.Exposed{Name: n, Local: echo})
		}
		registered = make(chan struct{}, 4)
		a := &clients.Agent{
			Dialer:      dialer(c, transport),
			Exposed:     exposed,
			AllowUsers:  []string{"bob"},
			Certificate: c.ReverseCertificate,
			Registered:  func([]string) { notify(registered) },
			Logger:      slog.New(slog.NewTextHandler(log, nil)),
		}
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { errc <- a.Run(ctx) }()
		var once sync.Once
		stop = func() {
			once.Do(func() {
				cancel()
				if err, ok := waitEnd(t, "the agent", errc, stopBound); ok && err != nil {
					t.Errorf("agent %v: %v", names, err)
				}
			})
		}
		t.Cleanup(stop)
		return registered, stop
	}
	waitRegistered := func(ch chan struct{}, who string) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
			t.Fatalf("%s did not register within 30s", who)
		}
	}
	var quiet, second testlog.Buffer
	reg1, stop1 := agent(alice, clients.TransportQUIC, &quiet, "one", "two")
	waitRegistered(reg1, "alice's first agent")
	reg2, _ := agent(alice, clients.TransportTLS, &second, "three")
	poll(t, "alice's second agent refused", func() bool {
		return strings.Contains(second.String(), "too_many_names") && strings.Contains(second.String(), "max-reverse-names-per-identity")
	})
	select {
	case <-reg2:
		t.Fatal("alice's second agent registered a third name")
	default:
	}
	regBob, _ := agent(bob, clients.TransportTLS, &quiet, "bob1", "bob2")
	waitRegistered(regBob, "bob's agent")

	stop1() // unregisters: the names are free at once, and the second agent's retry gets in
	waitRegistered(reg2, "alice's second agent after her first stopped")
	if owner, _ := d.proxy.ReverseOwner("three." + d.cfg.ReverseZone); owner != "alice@laptop" {
		t.Fatalf("three is held by %q", owner)
	}
}
