package tpd

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// allowAllDials is what a careless administrator might add next to the default
// policy; the default policy's internal-address rule must still hold.
const allowAllDials = `package tp.authz

allow if input.action == "dial"
`

// daemonRun is a tpd started on a data dir that outlives it.
type daemonRun struct {
	d    *Daemon
	addr string // the public port
	url  string
	logs *testlog.Buffer
	stop func()
}

// newDataDir initialises a data dir with the given policy files (name → source).
func newDataDir(t *testing.T, files map[string]string) config.Server {
	t.Helper()
	cfg := config.DefaultServer()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.PolicyTimeout = 5 * time.Second // -race is slow; the bound is tested in policy/
	cfg.QUIC = false
	if _, err := Init(cfg); err != nil {
		t.Fatal(err)
	}
	for name, src := range files {
		if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), name), []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return cfg
}

// runDaemon serves cfg on a fresh loopback port until stop (or the test's end).
func runDaemon(t testing.TB, cfg config.Server, opts ...Option) *daemonRun {
	t.Helper()
	ln, err := Listen("127.0.0.1:0", true) // a port free on UDP too, for QUIC
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = ln.Addr().String()
	logs := &testlog.Buffer{}
	d, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(logs, nil)), opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, ln) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			err, ended := waitEnd(t, "the daemon's Serve", done, daemonStopBound(cfg.ShutdownTimeout))
			if !ended {
				return // Serve still runs: closing under it would only add noise
			}
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
			d.Close()
		})
	}
	t.Cleanup(stop)
	return &daemonRun{d: d, addr: cfg.Listen, url: cfg.PublicURL(), logs: logs, stop: stop}
}

// openSession dials addr through tpd, checks one round trip and returns the
// connection, which stays open.
func openSession(t *testing.T, c *clients.Client, addr string) net.Conn {
	t.Helper()
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatalf("open session to %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(conn, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	return conn
}

// waitClosed waits up to 10 s for the server to end a session.
func waitClosed(t *testing.T, conn net.Conn) {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.ReadAll(conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the live session was not closed within 10s")
	}
}

// waitLog polls the daemon's log for substr.
func waitLog(t *testing.T, r *daemonRun, substr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(r.logs.String(), substr) {
		if time.Now().After(deadline) {
			t.Fatalf("log has no %q:\n%s", substr, r.logs.String())
		}
		<-tick.C
	}
}

// The default policy, with a rule that allows every dial, still refuses loopback in
// every spelling, until allowed_internal opens it; and tpd never dials itself.
func TestDefaultPolicyRefusesInternalWithRealOPA(t *testing.T) {
	t.Parallel()
	cfg := newDataDir(t, map[string]string{"all.rego": allowAllDials})
	r := runDaemon(t, cfg)
	echo := testnet.Echo(t)
	c, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	port := strings.TrimPrefix(echo, "127.0.0.1:")
	for _, host := range []string{"127.0.0.1", "localhost", "127.1", "0x7f.0.0.1", "2130706433", "017700000001", "[::ffff:127.0.0.1]"} {
		err := dialEcho(t, c, host+":"+port)
		if !errors.Is(err, authz.ErrPolicyDenied) || !strings.Contains(err.Error(), "internal address") {
			t.Fatalf("%s: %v; want a policy denial for an internal address", host, err)
		}
	}
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "open.rego"), []byte("package tp.authz\n\nallowed_internal contains \"127.0.0.1/32\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.d.ReloadPolicy(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"127.0.0.1", "2130706433", "[::ffff:127.0.0.1]"} {
		if err := dialEcho(t, c, host+":"+port); err != nil {
			t.Fatalf("%s after allowed_internal: %v", host, err)
		}
	}
	// 127.0.0.2 is still closed: allowed_internal names exactly one address.
	if err := dialEcho(t, c, "127.0.0.2:"+port); !errors.Is(err, authz.ErrPolicyDenied) {
		t.Fatalf("127.0.0.2: %v", err)
	}
	var re *clients.RefusedError
	err := dialEcho(t, c, r.addr)
	if !errors.As(err, &re) || re.Code != wire.CodeSelfDial {
		t.Fatalf("dialing tpd through itself: %v; want %s", err, wire.CodeSelfDial)
	}
}

// DNS rebinding against the real policy: the resolver first answers the opened
// address, then a closed one. Each request resolves once and reaches only the
// address the policy judged.
func TestDNSRebindingWithRealOPA(t *testing.T) {
	t.Parallel()
	cfg := newDataDir(t, map[string]string{"all.rego": allowAllDials,
		"open.rego": "package tp.authz\n\nallowed_internal contains \"127.0.0.1/32\"\n"})
	var lookups atomic.Int64
	resolver := resolverFunc(func(host string) ([]netip.Addr, error) {
		if lookups.Add(1)%2 == 1 {
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		}
		return []netip.Addr{netip.MustParseAddr("127.0.0.2")}, nil
	})
	r := runDaemon(t, cfg, WithResolver(resolver))
	echo := testnet.Echo(t)
	port := strings.TrimPrefix(echo, "127.0.0.1:")
	var reached atomic.Int64
	testnet.ServeAt(t, "127.0.0.2:"+port, func(*net.TCPConn) { reached.Add(1) })
	c, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	for i := range 2 {
		if err := dialEcho(t, c, "rebind.test:"+port); err != nil {
			t.Fatalf("round %d, first answer: %v", i, err)
		}
		if err := dialEcho(t, c, "rebind.test:"+port); !errors.Is(err, authz.ErrPolicyDenied) {
			t.Fatalf("round %d, rebound answer: %v", i, err)
		}
	}
	if n := lookups.Load(); n != 4 {
		t.Fatalf("%d lookups for 4 requests; want exactly one each", n)
	}
	if n := reached.Load(); n != 0 {
		t.Fatalf("the closed address was reached %d times", n)
	}
}

type resolverFunc func(host string) ([]netip.Addr, error)

func (f resolverFunc) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	return f(host)
}

// tpd revoke (through the admin socket) ends a live session at once, refuses new
// connections, and survives a restart; removing the entry restores access.
func TestRevokeLiveSessionAndRestart(t *testing.T) {
	t.Parallel()
	cfg := newDataDir(t, map[string]string{"tp.rego": allowAlice})
	r := runDaemon(t, cfg)
	echo := testnet.Echo(t)
	c, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	conn := openSession(t, c, echo)
	ac := admin.NewClient(cfg.AdminSocket())
	res, err := ac.Revoke(context.Background(), admin.RevokeRequest{Kind: "device", Value: "alice/laptop"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Value != "alice@laptop" || res.Closed != 1 {
		t.Fatalf("revoke: %+v; want alice@laptop and 1 session closed", res)
	}
	waitClosed(t, conn)
	waitLog(t, r, "no longer authorised")
	if err := dialEcho(t, c, echo); err == nil {
		t.Fatal("revoked device still connects")
	}
	if _, err := ac.Revoke(context.Background(), admin.RevokeRequest{Kind: "device", Value: "nobody"}); err == nil {
		t.Fatal("an invalid device ID was accepted")
	}
	r.stop()

	r2 := runDaemon(t, cfg)
	c.Profile.Server = r2.url
	if err := c.Home.SaveProfile(c.Profile); err != nil {
		t.Fatal(err)
	}
	c2, err := clients.Open(c.Home)
	if err != nil {
		t.Fatal(err)
	}
	if err := dialEcho(t, c2, echo); err == nil {
		t.Fatal("the revocation did not survive a restart")
	}
	if _, err := admin.NewClient(cfg.AdminSocket()).Revoke(context.Background(), admin.RevokeRequest{Kind: "device", Value: "alice@laptop", Remove: true}); err != nil {
		t.Fatal(err)
	}
	if err := dialEcho(t, c2, echo); err != nil {
		t.Fatalf("after removing the entry: %v", err)
	}
	// Revoking by user and by serial works the same way. The session dialEcho
	// closed ends at the server a moment after the client's Close; until it
	// has, a revoke counts it among the sessions it closed.
	waitFor(t, "the closed session to end at the server", func() bool { return len(r2.d.proxy.LiveSessions()) == 0 })
	conn = openSession(t, c2, echo)
	if res, err := r2.d.Revoke(context.Background(), "user", "alice", false); err != nil || res.Closed != 1 {
		t.Fatalf("revoke user: %+v, %v", res, err)
	}
	waitClosed(t, conn)
}

// A policy change ends live sessions the new policy refuses, within seconds, and
// the log says why; sessions it still allows continue.
func TestPolicyChangeClosesLiveSessions(t *testing.T) {
	t.Parallel()
	cfg := newDataDir(t, map[string]string{"tp.rego": `package tp.authz

default allow := false

allow if input.identity.user in {"alice", "bob"}
`})
	r := runDaemon(t, cfg)
	echo := testnet.Echo(t)
	alice, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	bob, _, _ := enrollClient(t, r.d, r.url, "bob", "pc")
	aliceConn := openSession(t, alice, echo)
	bobConn := openSession(t, bob, echo)
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(allowAlice+"\nreason := \"bob's access ended\" if not allow\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// No explicit reload: tpd's own watch picks the edit up.
	waitClosed(t, bobConn)
	waitLog(t, r, "bob's access ended")
	if _, err := aliceConn.Write([]byte("y")); err != nil {
		t.Fatal(err)
	}
	_ = aliceConn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(aliceConn, make([]byte, 1)); err != nil {
		t.Fatalf("alice's session did not survive a policy that still allows it: %v", err)
	}
}

// When a user loses a group, their live sessions that needed it end within seconds.
func TestGroupChangeClosesLiveSessions(t *testing.T) {
	t.Parallel()
	cfg := newDataDir(t, map[string]string{"tp.rego": `package tp.authz

default allow := false

allow if "ops" in input.identity.groups
`})
	r := runDaemon(t, cfg)
	echo := testnet.Echo(t)
	if _, err := r.d.Users().Enroll("alice", "laptop", []string{"ops"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	c, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	conn := openSession(t, c, echo)
	// Changing groups is what `tpd enroll alice --device … --groups dev` does.
	if _, err := r.d.Users().Enroll("alice", "phone", []string{"dev"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, conn)
	waitLog(t, r, "users or groups changed")
}

// The decision log configured by decision-log gets one line per decision.
func TestDecisionLogConfigured(t *testing.T) {
	t.Parallel()
	cfg := newDataDir(t, map[string]string{"tp.rego": allowAlice})
	cfg.DecisionLog = filepath.Join(cfg.DataDir, "decisions.jsonl")
	r := runDaemon(t, cfg)
	echo := testnet.Echo(t)
	c, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(cfg.DecisionLog)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"decision":"allow"`) || !strings.Contains(string(b), `"device_id":"alice@laptop"`) ||
		!strings.Contains(string(b), `"revision":"`+r.d.Policy().Revision()+`"`) || strings.Contains(string(b), "BEGIN") {
		t.Fatalf("decision log:\n%s", b)
	}
}
