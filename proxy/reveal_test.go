package proxy_test

import (
	"bytes"
	"crypto/tls"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testdns"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// rawRefusal sends a dial hello for host:port as the holder of cert and returns every
// byte the server sent back: the refusal exactly as the client sees it.
func rawRefusal(t *testing.T, e *env, cert tls.Certificate, host string, port int) []byte {
	t.Helper()
	cfg := e.clientTLS(&cert)
	cfg.NextProtos = []string{wire.ALPN}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if err := wire.WriteClientHello(c, wire.ClientHello{V: 1, Op: "dial", Net: "tcp", Host: host, Port: port}); err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the answer for %s: %v", host, err)
	}
	return raw
}

func decodeHello(t *testing.T, raw []byte) wire.ServerHello {
	t.Helper()
	sh, err := wire.ReadServerHello(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("server hello %q: %v", raw, err)
	}
	return sh
}

// Refusals tell a device nothing about a name that the policy does not let it
// reach, and nothing about the network to a device it does: the bad inputs are
// probes of names that exist and names that do not, through a real DNS client and
// server. Before, a refused device got resolve_failed for a missing name (and a
// policy denial for an existing one), and every reason carried the resolver's
// address and answer ("lookup … on 127.0.0.53:53: no such host") or the address
// dialled ("cannot connect to … (127.0.0.1:…)"). The details go to the log.
func TestRefusalsRevealNothingAboutNames(t *testing.T) {
	t.Parallel()
	dns := testdns.Start(t)
	logs := &testlog.Buffer{}
	az := &recordingAuthorizer{decide: func(req authz.Request) authz.Decision {
		if req.Identity.DeviceID == "alice@laptop" {
			return authz.Decision{Allow: true}
		}
		return authz.Decision{Reason: req.Identity.DeviceID + " may not reach " + req.Destination.Host}
	}}
	e := newEnv(t, func(c *proxy.Config) {
		c.Authorizer = az
		c.Resolver = dns.Resolver()
		c.Logger = newJSONLogger(logs)
	})
	bob := e.ca.ClientCert(t, "bob@pc", testpki.LeafOptions{})
	echo := netip.MustParseAddrPort(e.echo)
	port := int(echo.Port())

	// Bob may not reach probe.test: whether it exists, points inside or does not
	// exist, he gets the same bytes, and the policy is asked every time.
	dns.Set("probe.test", echo.Addr())
	exists := rawRefusal(t, e, bob, "probe.test", port)
	dns.Set("probe.test", netip.MustParseAddr("::ffff:0:7f00:1"))
	existsV6 := rawRefusal(t, e, bob, "probe.test", port)
	dns.Set("probe.test")
	missing := rawRefusal(t, e, bob, "probe.test", port)
	if !bytes.Equal(exists, missing) || !bytes.Equal(existsV6, missing) {
		t.Fatalf("a refused device tells existing from missing names:\n exists  %q\n AAAA    %q\n missing %q", exists, existsV6, missing)
	}
	if sh := decodeHello(t, missing); sh.Code != wire.CodePolicyDenied || sh.Reason != "bob@pc may not reach probe.test" {
		t.Fatalf("refused device, missing name: %+v; want the policy's denial", sh)
	}
	if req := az.last(t); req.Identity.DeviceID != "bob@pc" || len(req.Destination.IPs) != 0 {
		t.Fatalf("policy asked %+v for a missing name; want bob with no addresses", req.Destination)
	}

	// Alice may: she learns that the name does not resolve, and nothing else.
	sh := decodeHello(t, rawRefusal(t, e, e.cert, "probe.test", port))
	if sh.Code != wire.CodeResolveFailed || sh.Reason != "cannot resolve probe.test" {
		t.Fatalf("allowed device, missing name: %+v; want resolve_failed \"cannot resolve probe.test\"", sh)
	}
	waitFor(t, func() bool { return strings.Contains(logs.String(), "resolving probe.test: lookup probe.test") })

	// A failed connection names host:port as asked and a cause, not the address.
	closed := testnet.FreeAddr(t, "tcp")
	dns.Set("refusing.test", closed.Addr())
	sh = decodeHello(t, rawRefusal(t, e, e.cert, "refusing.test", int(closed.Port())))
	want := "cannot connect to refusing.test:" + strconv.Itoa(int(closed.Port())) + ": the connection was refused"
	if sh.Code != wire.CodeDialRefused || sh.Reason != want {
		t.Fatalf("allowed device, refusing destination: %+v; want dial_refused %q", sh, want)
	}
	waitFor(t, func() bool { return strings.Contains(logs.String(), closed.String()+": connect: connection refused") })

	// Names that resolve to the server itself are refused without saying its address.
	self := netip.MustParseAddrPort(e.addr)
	dns.Set("self.test", self.Addr())
	sh = decodeHello(t, rawRefusal(t, e, e.cert, "self.test", int(self.Port())))
	if sh.Code != wire.CodeSelfDial || strings.Contains(sh.Reason, self.Addr().String()) {
		t.Fatalf("self dial by name: %+v; want self_dial without the address", sh)
	}

	e.mustEcho(t)
}
