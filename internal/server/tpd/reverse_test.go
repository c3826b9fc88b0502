package tpd

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testcut"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

const reversePolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user in {"alice", "mallory"}
}

allow if {
	input.action == "dial"
	input.destination.reverse == "svc"
	input.identity.user in {"bob", "dave"}
}
`

// capture records every byte that passes through the relay's streams to the agent.
type capture struct {
	mu  sync.Mutex
	buf bytes.Buffer
	raw []net.Conn
}

func (c *capture) wrap(conn net.Conn) net.Conn {
	c.mu.Lock()
	c.raw = append(c.raw, conn)
	c.mu.Unlock()
	return &tapConn{Conn: conn, c: c}
}

func (c *capture) contains(b []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Contains(c.buf.Bytes(), b)
}

func (c *capture) size() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Len()
}

type tapConn struct {
	net.Conn
	c *capture
}

func (t *tapConn) Read(p []byte) (int, error) {
	n, err := t.Conn.Read(p)
	t.c.mu.Lock()
	t.c.buf.Write(p[:n])
	t.c.mu.Unlock()
	return n, err
}

func (t *tapConn) Write(p []byte) (int, error) {
	t.c.mu.Lock()
	t.c.buf.Write(p)
	t.c.mu.Unlock()
	return t.Conn.Write(p)
}

func (t *tapConn) CloseWrite() error { return t.Conn.(wire.Stream).CloseWrite() }

// startAgent runs alice's agent for "svc" → local and waits until it registered.
func startAgent(t testing.TB, c *clients.Client, transport, local string, allowUsers []string, tap *capture) (stop func(), errc chan error) {
	t.Helper()
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	d.Transport = transport
	registered := make(chan struct{}, 10)
	a := &clients.Agent{
		Dialer:      d,
		Exposed:     []clients.Exposed{{Name: "svc", Local: local}},
		AllowUsers:  allowUsers,
		Certificate: c.ReverseCertificate,
		Registered:  func([]string) { notify(registered) },
	}
	if tap != nil {
		a.WrapData = tap.wrap
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc = make(chan error, 1)
	go func() { errc <- a.Run(ctx); d.Close() }()
	select {
	case <-registered:
	case err := <-errc:
		cancel()
		t.Fatalf("agent ended before registering: %v", err)
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("agent did not register within 30s")
	}
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cancel()
			waitEnd(t, "the agent", errc, stopBound)
		}
	}
	t.Cleanup(stop)
	return stop, errc
}

func dialReverse(c *clients.Client, transport string, msg []byte) ([]byte, error) {
	d, err := c.Dialer()
	if err != nil {
		return nil, err
	}
	defer d.Close()
	d.Transport = transport
	conn, err := d.DialContext(context.Background(), "tcp", "svc.rev.tp.internal:22")
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if _, err := conn.Write(msg); err != nil {
		return nil, err
	}
	conn.(interface{ CloseWrite() error }).CloseWrite()
	return io.ReadAll(conn)
}

// Protected mode end to end over both carriers: bob reaches alice's service through
// the relay, the relay forwards only ciphertext, carol is refused by policy.
func TestReverseProtected(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, reversePolicy)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	carol, _, _ := enrollClient(t, d, url, "carol", "pc")
	local := testnet.Upper(t)
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			tap := &capture{}
			stop, _ := startAgent(t, alice, transport, local, []string{"bob"}, tap)
			marker := []byte("plaintext-marker-" + transport)
			got, err := dialReverse(bob, transport, marker)
			if err != nil {
				t.Fatalf("bob: %v", err)
			}
			if !bytes.Equal(got, bytes.ToUpper(marker)) {
				t.Fatalf("bob got %q", got)
			}
			if tap.size() == 0 {
				t.Fatal("the capture saw nothing: the test does not observe the relay")
			}
			if tap.contains(marker) || tap.contains(bytes.ToUpper(marker)) {
				t.Fatal("the relay forwarded plaintext")
			}
			_, err = dialReverse(carol, transport, marker)
			var re *clients.RefusedError
			if !errors.As(err, &re) || re.Code != wire.CodePolicyDenied || !strings.Contains(err.Error(), "denied by policy") {
				t.Fatalf("carol: %v; want a policy denial", err)
			}
			stop() // Ctrl-C unregisters at once: no grace period for a clean stop
			_, err = dialReverse(bob, transport, marker)
			if !errors.As(err, &re) || re.Code != wire.CodeReverseUnknown {
				t.Fatalf("after the agent stopped: %v; want %s", err, wire.CodeReverseUnknown)
			}
		})
	}
}

// Both layers decide: dave passes the relay's policy but not the agent's allow
// list; carol would pass the agent's list but not the policy.
func TestReverseBothLayers(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, reversePolicy)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	dave, _, _ := enrollClient(t, d, url, "dave", "pc")
	carol, _, _ := enrollClient(t, d, url, "carol", "pc")
	startAgent(t, alice, clients.TransportTLS, testnet.Upper(t), []string{"carol"}, nil)
	_, err := dialReverse(dave, clients.TransportTLS, []byte("x"))
	var re *clients.RefusedError
	if !errors.As(err, &re) || re.Code != clients.CodeAgentDenied || !strings.Contains(err.Error(), "dave@pc is not allowed by the agent") {
		t.Fatalf("dave: %v; want the agent's refusal", err)
	}
	_, err = dialReverse(carol, clients.TransportTLS, []byte("x"))
	if !errors.As(err, &re) || re.Code != wire.CodePolicyDenied {
		t.Fatalf("carol: %v; want the relay's policy denial", err)
	}
}

// A name belongs to its owner: another identity can neither take it while the
// owner is online, nor in the grace period after the owner dropped off, nor get a
// certificate for it; the owner's reconnect takes it back.
func TestReverseNameHijack(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, reversePolicy)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	mallory, _, _ := enrollClient(t, d, url, "mallory", "pc")
	local := testnet.Upper(t)

	// Online: refused, and alice keeps the name.
	stop, _ := startAgent(t, alice, clients.TransportTLS, local, []string{"bob"}, nil)
	if err := runMallory(t, mallory); err == nil || !strings.Contains(err.Error(), "registered by another identity") {
		t.Fatalf("mallory while alice is online: %v; want name taken", err)
	}
	if _, err := mallory.ReverseCertificate(context.Background(), "svc.rev.tp.internal"); err == nil || !strings.Contains(err.Error(), "is not registered to mallory@pc") {
		t.Fatalf("mallory's certificate request: %v; want a refusal", err)
	}
	stop()

	// Offline in the grace period: alice's control connection breaks without
	// unregistering (as when her laptop changes networks).
	ad, _ := alice.Dialer()
	cfg := ad.TLSConfig.Clone()
	cfg.NextProtos, cfg.ServerName = []string{wire.ALPN}, "localhost"
	raw, err := tls.Dial("tcp", ad.Server, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := wire.WriteClientHello(raw, wire.ClientHello{V: 1, Op: wire.OpListen, Net: "tcp", Names: []string{"svc"}}); err != nil {
		t.Fatal(err)
	}
	if sh, err := wire.ReadServerHello(raw); err != nil || !sh.OK {
		t.Fatalf("alice's raw listen: %+v %v", sh, err)
	}
	raw.NetConn().Close()
	refusedWhileReconnecting(t, func() error { return runMallory(t, mallory) })
	startAgent(t, alice, clients.TransportTLS, local, []string{"bob"}, nil) // the owner takes it back
}

// refusedWhileReconnecting checks that attempt (another identity taking a held
// name) is refused, right after the owner's control connection broke, until the
// refusal says the owner is reconnecting: until tpd notices the broken
// connection the owner still counts as online, and either way the name is refused.
func refusedWhileReconnecting(t *testing.T, attempt func() error) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := attempt()
		var re *clients.RefusedError
		if !errors.As(err, &re) || re.Code != wire.CodeNameTaken || time.Now().After(deadline) {
			t.Fatalf("another identity while the owner is offline: %v; want %s (reconnecting)", err, wire.CodeNameTaken)
		}
		if strings.Contains(err.Error(), "reconnecting") {
			return
		}
		time.Sleep(20 * time.Millisecond) // polling for tpd to notice the drop, bounded by the deadline
	}
}

func runMallory(t *testing.T, c *clients.Client) error {
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.Transport = clients.TransportTLS
	a := &clients.Agent{Dialer: d, Exposed: []clients.Exposed{{Name: "svc", Local: "127.0.0.1:1"}},
		AllowUsers: []string{"mallory"}, Certificate: c.ReverseCertificate}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return a.Run(ctx)
}

// An agent that dies mid-transfer (its streams cut without TLS close_notify) is an
// error for the dialer, never a silent short read.
func TestReverseAgentDiesMidTransfer(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, reversePolicy)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	stream := testnet.Stream(t) // a service that streams forever
	for _, transport := range []string{clients.TransportTLS, clients.TransportQUIC} {
		t.Run(transport, func(t *testing.T) {
			tap := &capture{}
			startAgent(t, alice, transport, stream, []string{"bob"}, tap)
			bd, _ := bob.Dialer()
			defer bd.Close()
			bd.Transport = transport
			conn, err := bd.DialContext(context.Background(), "tcp", "svc.rev.tp.internal:22")
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := io.CopyN(io.Discard, conn, 1<<20); err != nil {
				t.Fatal(err)
			}
			tap.mu.Lock()
			for _, c := range tap.raw { // the agent process dies: no close_notify
				if tc, ok := c.(*tls.Conn); ok {
					tc.NetConn().Close()
				} else {
					c.Close()
				}
			}
			tap.mu.Unlock()
			conn.SetReadDeadline(time.Now().Add(30 * time.Second))
			_, err = io.Copy(io.Discard, conn)
			testcut.Check(t, "the dialer", err)
		})
	}
}
