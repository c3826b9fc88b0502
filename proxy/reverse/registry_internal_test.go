package reverse

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/tp-proxy/tp/authz"
)

// pipeStream is one end of a net.Pipe as a Stream.
type pipeStream struct{ net.Conn }

func (pipeStream) CloseWrite() error { return nil }

// withDefaults fills in what o leaves out as the server does
// (proxy.ReverseOptions).
func withDefaults(o Options) Options {
	if o.Grace <= 0 {
		o.Grace = 30 * time.Second
	}
	if o.RestartGrace <= 0 {
		o.RestartGrace = 2 * time.Minute
	}
	o.RestartGrace = max(o.RestartGrace, o.Grace)
	if o.MaxPending <= 0 {
		o.MaxPending = 1000
	}
	if o.MaxNamesPerIdentity <= 0 {
		o.MaxNamesPerIdentity = 64
	}
	if o.PickupTimeout <= 0 {
		o.PickupTimeout = 10 * time.Second
	}
	if o.Lease <= 0 {
		o.Lease = 15 * time.Second
	}
	if o.Renew <= 0 {
		o.Renew = 5 * time.Second
	}
	o.Renew = min(o.Renew, o.Lease/3)
	return o
}

func newSessionID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// neverPicksUp is a registry of PickupTimeout pickup with one TLS agent, alice's,
// holding svc.rev.test, that reads its announcements and never accepts one.
func neverPicksUp(t *testing.T, pickup time.Duration) (*Registry, *Agent) {
	t.Helper()
	r := New(withDefaults(Options{Zone: "rev.test", MaxPending: 1000, PickupTimeout: pickup}), Hooks{})
	ctl, agentSide := net.Pipe()
	go io.Copy(io.Discard, agentSide) // the agent reads announcements and never accepts
	t.Cleanup(func() { ctl.Close() })
	a := &Agent{ID: authz.Identity{DeviceID: "alice@laptop"}, Names: []string{"svc.rev.test"}, Ctl: pipeStream{ctl}}
	a.End = func(error) {}
	a.Open = r.TLSOpener(a)
	if _, herr := r.Claim(a); herr != nil {
		t.Fatal(herr)
	}
	return r, a
}

// announce opens n sessions to svc at once with ctx and returns where their
// refusal codes arrive.
func announce(ctx context.Context, a *Agent, n int) <-chan string {
	codes := make(chan string, n)
	for range n {
		go func() {
			_, herr := a.Open(ctx, wire.SessionHeader{V: 1, Session: newSessionID(), Name: "svc"})
			codes <- herr.Code
		}()
	}
	return codes
}

// An agent that never answers its announcements costs a bounded number of
// pending sessions: past MaxPending the oldest are refused as busy, and the
// rest end when their dialers give up. Bad input: 1100 announcements at once
// to an agent that accepts none. The pickup timeout is far away, so that only
// the bound refuses, however slowly a loaded machine announces.
func TestReversePendingBounded(t *testing.T) {
	t.Parallel()
	const n = 1100
	r, a := neverPicksUp(t, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	codes := announce(ctx, a, n)
	deadline := time.After(60 * time.Second)
	for i := 0; i < n-1000; i++ {
		select {
		case c := <-codes:
			if c != wire.CodeReverseBusy {
				t.Fatalf("announcement beyond the bound ended with %s; want %s", c, wire.CodeReverseBusy)
			}
			if p := r.pendingCount(); p > 1000 {
				t.Fatalf("%d sessions pending; the bound is 1000", p)
			}
		case <-deadline:
			t.Fatalf("only %d of the %d announcements beyond the bound were refused within 60s", i, n-1000)
		}
	}
	if p := r.pendingCount(); p != 1000 {
		t.Fatalf("%d sessions pending after %d announcements; want the bound, 1000", p, n)
	}
	cancel() // the dialers give up
	for i := 0; i < 1000; i++ {
		select {
		case c := <-codes:
			if c != wire.CodeReverseTimeout {
				t.Fatalf("a pending announcement whose dialer gave up ended with %s; want %s", c, wire.CodeReverseTimeout)
			}
		case <-deadline:
			t.Fatalf("only %d of 1000 pending announcements ended within 60s of their dialers giving up", i)
		}
	}
	if p := r.pendingCount(); p != 0 {
		t.Fatalf("%d sessions still pending; want none", p)
	}
}

// An announcement the agent never picks up is refused with reverse_timeout
// after PickupTimeout, and nothing stays pending.
func TestReversePickupTimeout(t *testing.T) {
	t.Parallel()
	r, a := neverPicksUp(t, 200*time.Millisecond)
	codes := announce(context.Background(), a, 10)
	for range 10 {
		select {
		case c := <-codes:
			if c != wire.CodeReverseTimeout {
				t.Fatalf("an announcement never picked up ended with %s; want %s", c, wire.CodeReverseTimeout)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("an announcement never picked up did not end within 60s")
		}
	}
	if p := r.pendingCount(); p != 0 {
		t.Fatalf("%d sessions still pending; want none", p)
	}
}

// A second identity never replaces a name's holder, online or in its grace
// period; the holder's own new session does.
func TestReverseClaim(t *testing.T) {
	t.Parallel()
	r := New(withDefaults(Options{Zone: "rev.test", Grace: time.Hour}), Hooks{})
	alice := &Agent{ID: authz.Identity{DeviceID: "alice@laptop"}, Names: []string{"a.rev.test"}}
	mallory := &Agent{ID: authz.Identity{DeviceID: "mallory@pc"}, Names: []string{"a.rev.test"}}
	if _, herr := r.Claim(alice); herr != nil {
		t.Fatal(herr)
	}
	if _, herr := r.Claim(mallory); herr == nil || herr.Code != wire.CodeNameTaken {
		t.Fatalf("online: %v", herr)
	}
	r.Release(alice, r.opts.Grace)
	if _, herr := r.Claim(mallory); herr == nil || herr.Code != wire.CodeNameTaken {
		t.Fatalf("grace: %v", herr)
	}
	if _, herr := r.Lookup("a.rev.test"); herr == nil || herr.Code != wire.CodeReverseOffline {
		t.Fatalf("lookup in grace: %v", herr)
	}
	alice2 := &Agent{ID: alice.ID, Names: alice.Names}
	if _, herr := r.Claim(alice2); herr != nil {
		t.Fatalf("owner's reconnect: %v", herr)
	}
	if owner, ok := r.Owner("a.rev.test"); !ok || owner != "alice@laptop" {
		t.Fatalf("owner %q %v", owner, ok)
	}
	if _, ok := r.Name("x.y.rev.test"); ok {
		t.Fatal("a name with a dot inside the label is not a reverse name")
	}
}

// After a restart (a kill -9 included) the saved holds stay their owners' for
// RestartGrace, not just Grace: an agent may need its idle timeout and a
// reconnect backoff to notice that the server is back. The bad input is another
// identity that asks for the name after Grace has run out but before the agent
// came back; it must be refused, and the owner must still get its name back. An
// offline hold's own end is kept when it is the later one.
func TestReverseRestoredHoldOutlastsGrace(t *testing.T) {
	t.Parallel()
	later := time.Now().Add(3 * time.Hour).UTC()
	holds := []Hold{
		{Key: "a.rev.test", Owner: "alice@laptop"},               // online when the server died
		{Key: "b.rev.test", Owner: "alice@laptop", Until: later}, // offline, its grace ends later
		{Key: "c.rev.test", Owner: "alice@laptop", Until: time.Now().Add(-time.Minute)},
	}
	start := time.Now()
	r := New(withDefaults(Options{Zone: "rev.test", Grace: time.Nanosecond, RestartGrace: time.Hour, Holds: holds}), Hooks{})
	for time.Since(start) <= time.Microsecond { // let Grace (1 ns) run out for sure
	}
	for _, n := range []string{"a.rev.test", "b.rev.test", "c.rev.test"} {
		mallory := &Agent{ID: authz.Identity{DeviceID: "mallory@pc"}, Names: []string{n}}
		if _, herr := r.Claim(mallory); herr == nil || herr.Code != wire.CodeNameTaken {
			t.Fatalf("%s: another identity after Grace, within RestartGrace: %v; want name_taken", n, herr)
		}
		if owner, ok := r.Owner(n); !ok || owner != "alice@laptop" {
			t.Fatalf("%s: owner %q %v after the restart", n, owner, ok)
		}
	}
	if e := r.names["b.rev.test"]; !e.until.Equal(later) {
		t.Fatalf("offline hold ends %s, want its own later end %s", e.until, later)
	}
	if e := r.names["a.rev.test"]; e.until.Before(start.Add(time.Hour)) {
		t.Fatalf("restored hold ends %s, want at least RestartGrace after the start", e.until)
	}
	alice := &Agent{ID: authz.Identity{DeviceID: "alice@laptop"}, Names: []string{"a.rev.test", "b.rev.test", "c.rev.test"}}
	if _, herr := r.Claim(alice); herr != nil {
		t.Fatalf("the owner's agent after the restart: %v", herr)
	}
}

// A pickup another instance offers for a name held here only for its owner's
// return (no agent) is refused, not followed to the agent it does not have.
// Bad input: a session pending for one agent of alice@laptop, and the offer
// naming another of her names, whose agent ended. tpd once crashed on it.
func TestPeerPendingNameInGrace(t *testing.T) {
	t.Parallel()
	r, a := neverPicksUp(t, time.Hour)
	other := &Agent{ID: a.ID, Names: []string{"two.rev.test"}, Ctl: a.Ctl}
	other.End = func(error) {}
	if _, herr := r.Claim(other); herr != nil {
		t.Fatal(herr)
	}
	r.Release(other, time.Hour) // two.rev.test is held, with no agent
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _, _ = a.Open(ctx, wire.SessionHeader{V: 1, Session: "s-1", Name: "svc"}) }()
	deadline := time.Now().Add(30 * time.Second)
	for r.Pending("s-1") == nil {
		if time.Now().After(deadline) {
			t.Fatal("the session was not pending within 30s")
		}
		time.Sleep(10 * time.Millisecond) // waiting for the announcement, bounded by the deadline above
	}
	if p := r.PeerPending("s-1", "alice@laptop", "two.rev.test", 0); p != nil {
		t.Fatal("a pickup offered for a name whose agent ended was accepted")
	}
}
