package proxy_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

func TestCanonicalHost(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{"DB.Internal.", "db.internal"},
		{"db.internal", "db.internal"},
		{"127.0.0.1", "127.0.0.1"},
		{"127.0.0.1.", "127.0.0.1"},
		{"127.1", "127.0.0.1"},
		{"127.0.1", "127.0.0.1"},
		{"0x7f.0.0.1", "127.0.0.1"},
		{"0X7F.0.0.1", "127.0.0.1"},
		{"0x7f000001", "127.0.0.1"},
		{"2130706433", "127.0.0.1"},
		{"017700000001", "127.0.0.1"},
		{"0177.0.0.01", "127.0.0.1"},
		{"0", "0.0.0.0"},
		{"169.254.43518", "169.254.169.254"},
		{"0xa9fea9fe", "169.254.169.254"},
		{"[::ffff:127.0.0.1]", "127.0.0.1"},
		{"::ffff:127.0.0.1", "127.0.0.1"},
		{"::FFFF:7f00:1", "127.0.0.1"},
		{"[::]", "::"},
		{"[::1]", "::1"},
		{"0:0:0:0:0:0:0:1", "::1"},
		{"64:ff9b::7f00:1", "64:ff9b::7f00:1"},
		{"xn--bcher-kva.example", "xn--bcher-kva.example"},
		{"_svc.example", "_svc.example"},
	}
	for _, tt := range tests {
		got, err := proxy.CanonicalHost(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("CanonicalHost(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{
		"1.2.3.4.5", "256.0.0.1", "127.0.0.256", "0x", "0x1g", "08", "4294967296", "1.16777216",
		"fe80::1%eth0", "[fe80::1%25eth0]", "[127.0.0.1]", "[::1", "::1]", "a..b", ".", "",
		"a:b", "a/b", "a%2e", strings.Repeat("a", 64) + ".example", "-1.2.3.4",
	} {
		if got, err := proxy.CanonicalHost(bad); err == nil {
			t.Errorf("CanonicalHost(%q) = %q; want an error", bad, got)
		}
	}
}

// recordingAuthorizer records requests and answers with decide.
type recordingAuthorizer struct {
	mu     sync.Mutex
	seen   []authz.Request
	decide func(authz.Request) authz.Decision
}

func (a *recordingAuthorizer) Authorize(_ context.Context, req authz.Request) (authz.Decision, error) {
	a.mu.Lock()
	a.seen = append(a.seen, req)
	a.mu.Unlock()
	return a.decide(req), nil
}

func (a *recordingAuthorizer) last(t *testing.T) authz.Request {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.seen) == 0 {
		t.Fatal("the authorizer was never asked")
	}
	return a.seen[len(a.seen)-1]
}

// countingListener accepts on addr and counts connections: a destination that
// must never be reached.
func countingListener(t *testing.T, addr string) *atomic.Int64 {
	t.Helper()
	var n atomic.Int64
	testnet.ServeAt(t, addr, func(*net.TCPConn) { n.Add(1) })
	return &n
}

// dialRaw sends a hand-written hello (so the host is sent exactly as given) and
// returns the server's answer and the connection.
func dialRaw(t *testing.T, e *env, host string, port int) (wire.ServerHello, net.Conn) {
	t.Helper()
	c := e.rawConn(t)
	if err := wire.WriteClientHello(c, wire.ClientHello{V: 1, Op: "dial", Net: "tcp", Host: host, Port: port}); err != nil {
		t.Fatal(err)
	}
	sh, err := wire.ReadServerHello(c)
	if err != nil {
		t.Fatalf("server hello for %q: %v", host, err)
	}
	return sh, c
}

func echoRoundTrip(t *testing.T, c net.Conn) {
	t.Helper()
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
		t.Fatalf("echo = %q, %v", b, err)
	}
}

// Every spelling of a loopback address reaches the policy as the address it means,
// without a name lookup, and the policy's answer holds for all of them.
func TestIPSpellingsReachPolicyCanonical(t *testing.T) {
	t.Parallel()
	var lookups atomic.Int64
	az := &recordingAuthorizer{decide: func(req authz.Request) authz.Decision {
		return authz.Decision{Allow: req.Destination.Host == "127.0.0.1"}
	}}
	e := newEnv(t, func(c *proxy.Config) {
		c.Authorizer = az
		c.Resolver = resolverFunc(func(host string) ([]netip.Addr, error) {
			lookups.Add(1)
			return nil, errors.New("no lookups expected")
		})
	})
	port := int(netip.MustParseAddrPort(e.echo).Port())
	for _, host := range []string{"127.0.0.1", "127.1", "0x7f.0.0.1", "2130706433", "017700000001", "0x7f000001",
		"[::ffff:127.0.0.1]", "::ffff:127.0.0.1", "127.0.0.1."} {
		sh, c := dialRaw(t, e, host, port)
		if !sh.OK {
			t.Fatalf("%s: refused: %+v", host, sh)
		}
		req := az.last(t)
		if req.Destination.Host != "127.0.0.1" || len(req.Destination.IPs) != 1 || req.Destination.IPs[0] != netip.MustParseAddr("127.0.0.1") {
			t.Fatalf("%s: policy saw host %q ips %v; want 127.0.0.1", host, req.Destination.Host, req.Destination.IPs)
		}
		echoRoundTrip(t, c)
		c.Close()
	}
	// [::] is the unspecified address: the policy sees "::", and here denies it.
	sh, _ := dialRaw(t, e, "[::]", port)
	if sh.OK || sh.Code != wire.CodePolicyDenied || az.last(t).Destination.Host != "::" {
		t.Fatalf("[::]: %+v, policy saw %q", sh, az.last(t).Destination.Host)
	}
	// Malformed numeric hosts are refused before the policy or a resolver sees them.
	for _, host := range []string{"127.0.0.256", "1.2.3.4.5", "0x7g.0.0.1", "[127.0.0.1]", "fe80::1%lo"} {
		if sh, _ := dialRaw(t, e, host, port); sh.OK || sh.Code != wire.CodeBadRequest {
			t.Fatalf("%s: %+v; want bad_request", host, sh)
		}
	}
	if n := lookups.Load(); n != 0 {
		t.Fatalf("%d name lookups for IP literals", n)
	}
}

// DNS rebinding: the resolver answers an allowed address first and a forbidden one
// afterwards. Each session resolves exactly once and connects to the address the
// policy judged; the forbidden address is never reached.
func TestDNSRebindingDialsCheckedIP(t *testing.T) {
	t.Parallel()
	var lookups atomic.Int64
	allowed := netip.MustParseAddr("127.0.0.1")
	forbidden := netip.MustParseAddr("127.0.0.2")
	az := &recordingAuthorizer{decide: func(req authz.Request) authz.Decision {
		for _, ip := range req.Destination.IPs {
			if ip != allowed {
				return authz.Decision{Reason: ip.String() + " is internal"}
			}
		}
		return authz.Decision{Allow: true}
	}}
	e := newEnv(t, func(c *proxy.Config) {
		c.Authorizer = az
		c.Resolver = resolverFunc(func(host string) ([]netip.Addr, error) {
			if lookups.Add(1)%2 == 1 {
				return []netip.Addr{allowed}, nil
			}
			return []netip.Addr{forbidden}, nil
		})
	})
	port := netip.MustParseAddrPort(e.echo).Port()
	reached := countingListener(t, netip.AddrPortFrom(forbidden, port).String())
	for i := range 3 {
		sh, c := dialRaw(t, e, "rebind.test", int(port))
		if lookups.Load() != int64(2*i+1) {
			t.Fatalf("session %d: %d lookups so far; want one per session", i, lookups.Load())
		}
		if !sh.OK {
			t.Fatalf("session %d: first answer refused: %+v", i, sh)
		}
		echoRoundTrip(t, c) // reached the echo on 127.0.0.1, the checked address
		c.Close()
		if sh, _ := dialRaw(t, e, "rebind.test", int(port)); sh.OK || sh.Code != wire.CodePolicyDenied {
			t.Fatalf("session %d: the rebound answer was not refused: %+v", i, sh)
		}
	}
	if n := reached.Load(); n != 0 {
		t.Fatalf("the forbidden address was connected to %d times", n)
	}
}

// A name whose addresses mix allowed and forbidden ones is refused as a whole (the
// policy sees every address), so neither is dialed.
func TestMixedAnswerNeverReachesForbidden(t *testing.T) {
	t.Parallel()
	forbidden := netip.MustParseAddr("127.0.0.2")
	az := &recordingAuthorizer{decide: func(req authz.Request) authz.Decision {
		for _, ip := range req.Destination.IPs {
			if ip == forbidden {
				return authz.Decision{Reason: "internal address"}
			}
		}
		return authz.Decision{Allow: true}
	}}
	var e *env
	e = newEnv(t, func(c *proxy.Config) {
		c.Authorizer = az
		c.Resolver = resolverFunc(func(string) ([]netip.Addr, error) {
			return []netip.Addr{forbidden, netip.MustParseAddrPort(e.echo).Addr(), forbidden}, nil
		})
	})
	port := netip.MustParseAddrPort(e.echo).Port()
	reached := countingListener(t, netip.AddrPortFrom(forbidden, port).String())
	sh, _ := dialRaw(t, e, "mixed.test", int(port))
	if sh.OK || sh.Code != wire.CodePolicyDenied {
		t.Fatalf("mixed answer: %+v", sh)
	}
	if ips := az.last(t).Destination.IPs; len(ips) != 2 {
		t.Fatalf("policy saw %v; want both distinct addresses", ips)
	}
	if reached.Load() != 0 {
		t.Fatal("the forbidden address was reached")
	}
}

// TP refuses to connect to its own listener, however it is named, even when the
// policy allows everything.
func TestSelfDialRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) {
		c.Resolver = mapResolver{"tp.test": {netip.MustParseAddr("127.0.0.1")}}
	})
	ap := netip.MustParseAddrPort(e.addr)
	for _, host := range []string{"127.0.0.1", "tp.test", "0.0.0.0", "::", "2130706433"} {
		sh, _ := dialRaw(t, e, host, int(ap.Port()))
		if sh.OK || sh.Code != wire.CodeSelfDial || !strings.Contains(sh.Reason, "itself") {
			t.Fatalf("%s: %+v; want %s", host, sh, wire.CodeSelfDial)
		}
	}
	e.mustEcho(t)
}

func TestSelfDialAllowedWhenConfigured(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) { c.AllowSelfDial = true })
	ap := netip.MustParseAddrPort(e.addr)
	sh, _ := dialRaw(t, e, "127.0.0.1", int(ap.Port()))
	if !sh.OK {
		t.Fatalf("%+v", sh)
	}
}

// A policy that does not answer in time denies with code policy_error.
func TestPolicyTimeoutDenies(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) {
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			if req.Destination.Port == 1 {
				return authz.Decision{Allow: true}, context.DeadlineExceeded
			}
			return authz.Decision{Allow: true}, nil
		})
	})
	_, err := e.dialer().DialContext(context.Background(), "tcp", "127.0.0.1:1")
	re := refused(t, err, wire.CodePolicyError)
	if !strings.Contains(re.Reason, "in time") {
		t.Fatalf("reason %q", re.Reason)
	}
	e.mustEcho(t)
}

// Recheck closes a live session that the authorizer no longer allows and keeps the
// others; the session's log line says why it ended.
func TestRecheckClosesSessionsNoLongerAllowed(t *testing.T) {
	t.Parallel()
	var deny atomic.Bool
	logs := &testlog.Buffer{}
	e := newEnv(t, func(c *proxy.Config) {
		c.Logger = newJSONLogger(logs)
		c.Authorizer = authorizerFunc(func(_ context.Context, req authz.Request) (authz.Decision, error) {
			if deny.Load() && req.Destination.Port != 0 {
				return authz.Decision{Reason: "alice lost access"}, nil
			}
			return authz.Decision{Allow: true}, nil
		})
	})
	c, err := e.dialer().DialContext(context.Background(), "tcp", e.echo)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoRoundTrip(t, c)
	waitFor(t, func() bool { return e.srv.Live() == 1 })
	if checked, closed := e.srv.Recheck(context.Background()); checked != 1 || closed != 0 {
		t.Fatalf("recheck while allowed: checked %d closed %d", checked, closed)
	}
	echoRoundTrip(t, c)
	deny.Store(true)
	if _, closed := e.srv.Recheck(context.Background()); closed != 1 {
		t.Fatalf("recheck after deny closed %d sessions", closed)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.ReadAll(c)
	var ne net.Error
	var ce *clients.CutError
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatal("session still open after the re-check denied it")
	case !errors.As(err, &ce): // ended by the server: a cut, never a clean end
		t.Fatalf("after the re-check denied the session the client read %v (%T); want a *clients.CutError", err, err)
	}
	waitFor(t, func() bool {
		return strings.Contains(logs.String(), "no longer authorised: the policy no longer allows it: alice lost access")
	})
	waitFor(t, func() bool { return e.srv.Live() == 0 })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		<-tick.C
	}
}

func newJSONLogger(w io.Writer) *slog.Logger { return slog.New(slog.NewJSONHandler(w, nil)) }
