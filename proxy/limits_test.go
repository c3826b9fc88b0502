package proxy_test

import (
	"context"
	"crypto/tls"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Bounds per device identity (limits.go): one device cannot take the server's
// sessions, reverse names or agents' pickup queues from everyone else, and
// another identity is served meanwhile.

var bothTransports = []string{clients.TransportTLS, clients.TransportQUIC}

// streamAs opens a tp/1 stream as the holder of cert: a TLS connection, or a
// stream on a QUIC connection of its own (qcfg: nil for the defaults).
func (q *quicEnv) streamAs(t *testing.T, cert *tls.Certificate, transport string, qcfg *quic.Config) wire.Stream {
	t.Helper()
	cfg := q.clientTLS(cert)
	cfg.NextProtos = []string{wire.ALPN}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var st wire.Stream
	if transport == clients.TransportQUIC {
		if qcfg == nil {
			qcfg = &quic.Config{}
		}
		c, err := quic.DialAddr(ctx, q.udpAddr, cfg, qcfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.CloseWithError(0, "") })
		str, err := c.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		st = wire.NewQUICStream(c, str)
	} else {
		c, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", q.addr)
		if err != nil {
			t.Fatal(err)
		}
		st = c.(*tls.Conn)
	}
	t.Cleanup(func() { _ = st.Close() })
	_ = st.SetDeadline(time.Now().Add(30 * time.Second))
	return st
}

// hello sends h on st and returns the server's answer.
func hello(st wire.Stream, h wire.ClientHello) (wire.ServerHello, error) {
	if err := wire.WriteClientHello(st, h); err != nil {
		return wire.ServerHello{}, err
	}
	return wire.ReadServerHello(st)
}

func mustHello(t *testing.T, st wire.Stream, h wire.ClientHello) wire.ServerHello {
	t.Helper()
	sh, err := hello(st, h)
	if err != nil {
		t.Fatal(err)
	}
	return sh
}

func dialHello(t testing.TB, addr string) wire.ClientHello {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	return wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: host, Port: p}
}

// wantRefusal checks a refusal's code and that its reason names each of want.
func wantRefusal(t *testing.T, sh wire.ServerHello, code string, want ...string) {
	t.Helper()
	if sh.OK || sh.Code != code {
		t.Fatalf("server hello %+v; want a refusal %s", sh, code)
	}
	for _, w := range want {
		if !strings.Contains(sh.Reason, w) {
			t.Fatalf("reason %q does not say %q", sh.Reason, w)
		}
	}
}

// abort ends st without a clean end: a TCP reset, or a QUIC stream reset.
func abort(t *testing.T, st wire.Stream) {
	t.Helper()
	switch c := st.(type) {
	case *wire.QUICStream:
		c.Abort(wire.QUICInternal)
	case *tls.Conn:
		if err := c.NetConn().(*net.TCPConn).SetLinger(0); err != nil {
			t.Fatal(err)
		}
		_ = c.NetConn().Close()
	}
}

// Bad input: one device (alice@laptop) opens more sessions than
// MaxSessionsPerIdentity (4), over TLS and QUIC at once. The excess is refused
// with too_many_sessions and a reason naming the device and the setting; bob
// opens as many as he likes meanwhile; every way a session ends gives its slot
// back: a refusal, a clean close, a reset, a policy change.
func TestIdentitySessionCap(t *testing.T) {
	t.Parallel()
	var denyAlice atomic.Bool
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.MaxSessionsPerIdentity = 4
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			if denyAlice.Load() && req.Identity.DeviceID == "alice@laptop" {
				return authz.Decision{Reason: "alice@laptop is suspended"}, nil
			}
			return allowAll(ctx, req)
		})
	}, proxy.QUICOptions{})
	alice, bob := &q.cert, q.ca.ClientCert(t, "bob@phone", testpki.LeafOptions{})
	open := func(cert *tls.Certificate, tr string) (wire.Stream, wire.ServerHello) {
		st := q.streamAs(t, cert, tr, nil)
		return st, mustHello(t, st, dialHello(t, q.echo))
	}
	openOK := func(cert *tls.Certificate, tr string) wire.Stream {
		t.Helper()
		st, sh := open(cert, tr)
		if !sh.OK {
			t.Fatalf("%s: %+v", tr, sh)
		}
		quicEcho(t, st, "open")
		return st
	}

	// Refused requests give their slots back: more of them than the bound.
	closed := testnet.FreeAddr(t, "tcp").String()
	for i := range 6 {
		st := q.streamAs(t, alice, bothTransports[i%2], nil)
		wantRefusal(t, mustHello(t, st, dialHello(t, closed)), wire.CodeDialRefused)
		_ = st.Close() // the slot is held until the client goes (at most a second)
	}
	waitFor(t, func() bool { return proxy.IdentitySessions(q.srv, "alice@laptop") == 0 })

	var mine []wire.Stream
	for i := range 4 {
		mine = append(mine, openOK(alice, bothTransports[i%2]))
	}
	for _, tr := range bothTransports {
		_, sh := open(alice, tr)
		wantRefusal(t, sh, proxy.CodeTooManySessions, "alice@laptop", "4 sessions", "max-sessions-per-identity")
	}
	var bobs []wire.Stream
	for i := range 4 { // his own bound is whole
		bobs = append(bobs, openOK(&bob, bothTransports[i%2]))
	}
	for _, st := range mine {
		quicEcho(t, st, "alice's sessions still work")
	}

	// A clean close and a reset each free a slot, on either transport.
	_ = mine[0].Close()
	abort(t, mine[1])
	waitFor(t, func() bool { return proxy.IdentitySessions(q.srv, "alice@laptop") == 2 })
	mine = append(mine[2:], openOK(alice, clients.TransportTLS), openOK(alice, clients.TransportQUIC))
	_, sh := open(alice, clients.TransportQUIC)
	wantRefusal(t, sh, proxy.CodeTooManySessions)
	abort(t, mine[0]) // the QUIC one of the first four
	_ = mine[1].Close()
	waitFor(t, func() bool { return proxy.IdentitySessions(q.srv, "alice@laptop") == 2 })
	mine = append(mine[2:], openOK(alice, clients.TransportQUIC), openOK(alice, clients.TransportTLS))

	// Sessions a policy change ends give their slots back too; bob's stay.
	// Re-checks that run at once (tpd's for a revocation and for a policy
	// edit) count each session they close once between them: before, each
	// counted every session it found not allowed, and a revocation said it
	// closed two sessions for one.
	denyAlice.Store(true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	counts := make(chan int, 3)
	for range cap(counts) {
		go func() { _, n := q.srv.Recheck(ctx); counts <- n }()
	}
	if n := <-counts + <-counts + <-counts; n != 4 {
		t.Fatalf("three re-checks at once closed %d sessions between them; want alice's 4, each counted once", n)
	}
	waitFor(t, func() bool { return proxy.IdentitySessions(q.srv, "alice@laptop") == 0 })
	if n := proxy.IdentitySessions(q.srv, "bob@phone"); n != 4 {
		t.Fatalf("bob has %d sessions counted; want 4", n)
	}
	for _, st := range bobs {
		quicEcho(t, st, "bob is unaffected")
	}
}

// Bad input: one device registers more reverse names than MaxNamesPerIdentity
// (4) over several control sessions, on both transports. The excess is refused
// with too_many_names; names reserved for it while an agent reconnects count,
// but never keep the owner from taking its own names back; bob registers his
// meanwhile; names an agent unregisters are free for the device at once.
func TestIdentityNameCap(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Reverse = proxy.ReverseOptions{Zone: "rev.test", Grace: time.Hour, MaxNamesPerIdentity: 4}
	}, proxy.QUICOptions{})
	alice, bob := &q.cert, q.ca.ClientCert(t, "bob@phone", testpki.LeafOptions{})
	listen := func(cert *tls.Certificate, tr string, names ...string) (wire.Stream, wire.ServerHello) {
		st := q.streamAs(t, cert, tr, nil)
		return st, mustHello(t, st, wire.ClientHello{V: wire.Version, Op: wire.OpListen, Net: "tcp", Names: names})
	}
	listenOK := func(cert *tls.Certificate, tr string, names ...string) wire.Stream {
		t.Helper()
		st, sh := listen(cert, tr, names...)
		if !sh.OK || len(sh.Names) != len(names) {
			t.Fatalf("listen %v over %s: %+v", names, tr, sh)
		}
		return st
	}
	owner := func(label string) string {
		o, _ := q.srv.ReverseOwner(label + ".rev.test")
		return o
	}

	_, sh := listen(alice, clients.TransportQUIC, "a1", "a2", "a3", "a4", "a5")
	wantRefusal(t, sh, proxy.CodeTooManyNames, "5 reverse names", "max-reverse-names-per-identity")

	ctl1 := listenOK(alice, clients.TransportTLS, "a1", "a2")
	listenOK(alice, clients.TransportQUIC, "a3", "a4")
	for _, tr := range bothTransports {
		_, sh := listen(alice, tr, "a5")
		wantRefusal(t, sh, proxy.CodeTooManyNames, "alice@laptop", "holds 4", "max-reverse-names-per-identity")
	}
	listenOK(&bob, clients.TransportQUIC, "b1", "b2", "b3", "b4")

	// The first agent goes away without unregistering: its names stay
	// reserved for alice, and count.
	_ = ctl1.Close()
	_, sh = listen(alice, clients.TransportTLS, "a5")
	wantRefusal(t, sh, proxy.CodeTooManyNames, "alice@laptop")
	ctl1 = listenOK(alice, clients.TransportTLS, "a1", "a2") // the owner's return
	if err := wire.WriteSessionHeader(ctl1, wire.SessionHeader{V: wire.Version, End: "unregister"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return owner("a1") == "" && owner("a2") == "" })
	listenOK(alice, clients.TransportQUIC, "a5")
	for _, n := range []string{"a3", "a4", "a5"} {
		if o := owner(n); o != "alice@laptop" {
			t.Fatalf("%s is held by %q", n, o)
		}
	}
	for _, n := range []string{"b1", "b2", "b3", "b4"} {
		if o := owner(n); o != "bob@phone" {
			t.Fatalf("%s is held by %q", n, o)
		}
	}
}

// Bad input: one device (alice@laptop) dials a reverse name whose agent does
// not pick sessions up, more often than MaxPendingPerIdentity (2). The excess
// is refused at once with too_many_pending, while bob's dial still waits for
// the agent; a pickup (TLS) and the agent going away give the slots back. Over
// TLS a session waits for the agent's accept connection; over QUIC for stream
// credit, which this agent never grants.
func TestIdentityPendingCap(t *testing.T) {
	t.Parallel()
	for _, tr := range bothTransports {
		t.Run(tr, func(t *testing.T) {
			q := newQUICEnv(t, func(c *proxy.Config) {
				c.Reverse = proxy.ReverseOptions{Zone: "rev.test", MaxPendingPerIdentity: 2, PickupTimeout: time.Minute}
			}, proxy.QUICOptions{})
			alice, bob := &q.cert, q.ca.ClientCert(t, "bob@phone", testpki.LeafOptions{})
			carol := q.ca.ClientCert(t, "carol@server", testpki.LeafOptions{})
			ctl := q.streamAs(t, &carol, tr, &quic.Config{MaxIncomingStreams: -1})
			if sh := mustHello(t, ctl, wire.ClientHello{V: wire.Version, Op: wire.OpListen, Net: "tcp", Names: []string{"svc"}}); !sh.OK {
				t.Fatalf("listen: %+v", sh)
			}
			_ = ctl.SetDeadline(time.Time{})
			announced := make(chan wire.SessionHeader, 16)
			go func() {
				for {
					h, err := wire.ReadSessionHeader(ctl)
					if err != nil {
						close(announced)
						return
					}
					if h.Session != "" {
						announced <- h
					}
				}
			}()

			svc := wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: "svc.rev.test", Port: 22}
			type answer struct {
				sh  wire.ServerHello
				err error
			}
			answers := make(chan answer, 8)
			waiting := 0
			dial := func(cert *tls.Certificate) {
				st := q.streamAs(t, cert, tr, nil)
				waiting++
				go func() {
					sh, err := hello(st, svc)
					answers <- answer{sh, err}
				}()
			}
			pending := func(id string, n int) func() bool {
				return func() bool { return proxy.IdentityPending(q.srv, id) == n }
			}

			dial(alice)
			dial(alice)
			waitFor(t, pending("alice@laptop", 2))
			wantRefusal(t, mustHello(t, q.streamAs(t, alice, tr, nil), svc), proxy.CodeTooManyPending, "alice@laptop", "max-pending-per-identity")
			dial(&bob)
			waitFor(t, pending("bob@phone", 1))

			if tr == clients.TransportTLS {
				// The agent picks one of alice's sessions up: she may dial again.
				var h wire.SessionHeader
				for h = range announced {
					if h.PeerID == "alice@laptop" {
						break
					}
				}
				acc := q.streamAs(t, &carol, tr, nil)
				if sh := mustHello(t, acc, wire.ClientHello{V: wire.Version, Op: wire.OpAccept, Session: h.Session}); !sh.OK {
					t.Fatalf("accept: %+v", sh)
				}
				if a := <-answers; a.err != nil || !a.sh.OK {
					t.Fatalf("the picked-up dial: %+v, %v", a.sh, a.err)
				}
				waiting--
				waitFor(t, pending("alice@laptop", 1))
				dial(alice)
				waitFor(t, pending("alice@laptop", 2))
			}

			// The agent goes away: every waiting dial is refused, and no slot is left.
			_ = ctl.Close()
			if qs, ok := ctl.(*wire.QUICStream); ok {
				_ = qs.Conn().CloseWithError(0, "")
			}
			for range waiting {
				a := <-answers
				if a.err != nil || a.sh.OK || a.sh.Code == proxy.CodeTooManyPending {
					t.Fatalf("a waiting dial after the agent left: %+v, %v", a.sh, a.err)
				}
			}
			waitFor(t, func() bool { return pending("alice@laptop", 0)() && pending("bob@phone", 0)() })
		})
	}
}
