package e2e

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// namePoller tries, every ~100 ms, to register name as another identity: what a
// device would do to take a name the moment its owner loses it.
type namePoller struct {
	name      string
	attempts  atomic.Int64
	refused   atomic.Int64 // name_taken
	mu        sync.Mutex
	takeovers []string // when and how the name was taken
}

// try makes one registration attempt; it reports whether the name was taken.
func (p *namePoller) try(c *clients.Client, d *clients.Dialer) bool {
	p.attempts.Add(1)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var taken bool
	a := &clients.Agent{Dialer: d, Exposed: []clients.Exposed{{Name: p.name, Local: "127.0.0.1:1"}},
		AllowUsers: []string{"mallory"}, Certificate: c.ReverseCertificate,
		Registered: func(full []string) { taken = true; cancel() }}
	err := a.Run(ctx)
	var re *clients.RefusedError
	if errors.As(err, &re) && re.Code == wire.CodeNameTaken {
		p.refused.Add(1)
	}
	return taken
}

// run polls until ctx ends.
func (p *namePoller) run(ctx context.Context, t *testing.T, c *clients.Client) {
	d, err := c.Dialer()
	if err != nil {
		t.Error(err)
		return
	}
	defer d.Close()
	d.Transport = clients.TransportTLS
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for ctx.Err() == nil {
		if p.try(c, d) {
			p.mu.Lock()
			p.takeovers = append(p.takeovers, time.Now().Format("15:04:05.000"))
			p.mu.Unlock()
		}
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
}

// tpd is killed with SIGKILL and started again, ten times in a row, while a QUIC
// agent and a TLS agent of alice's serve a name each and mallory (whose policy
// allows her to listen on any name) tries to take both names every 100 ms. The
// bad input is the crash itself, followed by mallory's attempts: zero takeovers,
// and both agents must come back after every crash by themselves. The time from
// the kill to each agent's new registration is logged.
func TestReverseNamesSurviveTPDKills(t *testing.T) {
	parallelLong(t)
	raceTPD(t)
	const kills = 10
	dataDir := initTPD(t, fmt.Sprintf(faultPolicy, 1))
	p := startTPD(t, dataDir, stableAddr(t), nil) // started again on its port after each kill
	addr, srv := p.Addr, p
	aliceQUIC := append(srv.login(t, "alice", "laptop"), "TP_TRANSPORT=quic")
	aliceTLS := append(srv.login(t, "alice", "desktop"), "TP_TRANSPORT=tls")
	bob := clientFor(t, srv.login(t, "bob", "phone"))
	mallory := clientFor(t, srv.login(t, "mallory", "pc"))
	echo := testnet.Echo(t)

	// The poller can take a name nobody holds: its zero below means something.
	free := &namePoller{name: "free"}
	{
		d, err := mallory.Dialer()
		if err != nil {
			t.Fatal(err)
		}
		d.Transport = clients.TransportTLS
		if !free.try(mallory, d) {
			t.Fatal("mallory could not register a free name; the poller below would prove nothing")
		}
		d.Close()
	}

	type agent struct {
		name  string
		proc  *agentProc
		times []time.Duration
	}
	agents := []*agent{
		{name: "crash-quic", proc: startAgentProc(t, aliceQUIC, "crash-quic", echo, "--allow-user", "bob")},
		{name: "crash-tls", proc: startAgentProc(t, aliceTLS, "crash-tls", echo, "--allow-user", "bob")},
	}
	for _, a := range agents {
		a.proc.waitRegistered(t)
	}
	// An agent serves its protected name once it holds the name's certificate,
	// which it orders right after it first registers: a kill in the middle
	// of that order would leave the first dial after it waiting for a new
	// one (several round trips to a loaded server) within the dial's own
	// handshake time. The crashes below are about the names, not that order.
	for _, a := range agents {
		waitLog(t, a.proc.log, a.name+".rev.tp.internal has its certificate", 90*time.Second)
	}

	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var pollers []*namePoller
	for _, a := range agents {
		pl := &namePoller{name: a.name}
		pollers = append(pollers, pl)
		wg.Add(1)
		go func() { defer wg.Done(); pl.run(ctx, t, mallory) }()
	}
	stopPolling := func() { stop(); wg.Wait() }
	defer stopPolling()

	for i := range kills {
		for _, a := range agents {
			if len(a.proc.registered) != 0 {
				t.Fatalf("kill %d: %s registered again before tpd was killed:\n%s", i+1, a.name, a.proc.log.String())
			}
		}
		killed := time.Now()
		p.kill(t)
		p = startTPD(t, dataDir, addr, nil)
		ready := time.Since(killed)
		back := make([]chan error, len(agents))
		for j, a := range agents { // both come back by themselves; timed apart
			back[j] = make(chan error, 1)
			go func() {
				select {
				case <-a.proc.registered:
					a.times = append(a.times, time.Since(killed))
					back[j] <- nil
				case <-a.proc.exited:
					back[j] <- fmt.Errorf("%s exited", a.name)
				case <-time.After(90 * time.Second):
					back[j] <- fmt.Errorf("%s did not come back within 90s", a.name)
				}
			}()
		}
		for j, a := range agents {
			if err := <-back[j]; err != nil {
				t.Fatalf("kill %d: %v:\n%s", i+1, err, a.proc.log.String())
			}
		}
		for _, a := range agents { // and serve
			c, err := dialName(t, bob, a.name+".rev.tp.internal")
			if err != nil {
				t.Fatalf("kill %d: dialing %s: %v", i+1, a.name, err)
			}
			err = echoOnce(c, fmt.Sprintf("after kill %d", i+1))
			c.Close()
			if err != nil {
				t.Fatalf("kill %d: %s: %v", i+1, a.name, err)
			}
		}
		for _, pl := range pollers {
			pl.mu.Lock()
			taken := slices.Clone(pl.takeovers)
			pl.mu.Unlock()
			if len(taken) != 0 {
				t.Fatalf("kill %d: mallory took %s at %v", i+1, pl.name, taken)
			}
		}
		t.Logf("kill %d: tpd ready after %s; agents back after %s (QUIC), %s (TLS)", i+1, ready.Round(time.Millisecond),
			agents[0].times[i].Round(time.Millisecond), agents[1].times[i].Round(time.Millisecond))
	}
	stopPolling()

	for _, pl := range pollers {
		if len(pl.takeovers) != 0 {
			t.Errorf("mallory took %s at %v", pl.name, pl.takeovers)
		}
		if pl.refused.Load() == 0 {
			t.Errorf("mallory's %d attempts on %s were never refused as name_taken: the poller did not reach tpd", pl.attempts.Load(), pl.name)
		}
		t.Logf("%s: %d attempts by mallory, %d refused as name_taken, %d takeovers", pl.name, pl.attempts.Load(), pl.refused.Load(), len(pl.takeovers))
	}
	for _, a := range agents {
		s := slices.Clone(a.times)
		slices.Sort(s)
		t.Logf("%s back after a kill -9: min %s, median %s, max %s (%d kills)", a.name,
			s[0].Round(time.Millisecond), s[len(s)/2].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond), len(s))
	}
}
