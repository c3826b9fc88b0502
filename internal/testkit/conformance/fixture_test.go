package conformance

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/tpd"
	"github.com/tp-proxy/tp/internal/testkit/testdns"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// corpusDir is docs/conformance, seen from this package's directory.
const corpusDir = "../../../docs/conformance"

// helloTimeout is the fixture's hello timeout (hello_timeout_ms): short, so the
// hello-timeout case is cheap, and long enough for a loaded machine under -race
// to send a hello right after its handshake.
const helloTimeout = 3 * time.Second

// readTimeout bounds every read of a runner: longer than the hello timeout, so
// that the server's hello_timeout answer arrives within it.
const readTimeout = helloTimeout + 8*time.Second

// fixturePolicy is the fixture's policy (docs/conformance/README.md): alice may
// reach the echo destinations, the unresolvable name and reverse names, and
// register names starting with "conf-"; bob may do nothing.
const fixturePolicy = `package tp.authz

default allow := false

allow if {
	input.identity.user == "alice"
	input.action in {"dial", "dial_udp"}
	input.destination.host in {"127.0.0.1", "echo.conf.test", "missing.conf.test"}
}

allow if {
	input.identity.user == "alice"
	input.action in {"dial", "dial_udp"}
	input.destination.reverse != ""
}

allow if {
	input.identity.user == "alice"
	input.action == "listen"
	startswith(input.destination.reverse, "conf-")
}
`

// fixture is a real tpd on loopback with the destinations and identities the
// corpus names.
type fixture struct {
	addr  string // the server's TCP and UDP address
	roots *x509.CertPool
	certs map[string]*tls.Certificate // by identity; nil: no certificate
	vars  Vars
}

// startFixture runs tpd in-process (embedded CA, OPA policy, QUIC), enrolls
// alice and bob through its CA as dlogin does, and starts the destinations.
func startFixture(t *testing.T) *fixture {
	t.Helper()
	dns := testdns.Start(t)
	dns.Set("echo.conf.test", netip.MustParseAddr("127.0.0.1"))

	cfg := config.DefaultServer()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.PolicyTimeout = 5 * time.Second // -race is slow; the bound is not what is tested here
	cfg.HelloTimeout = helloTimeout
	if _, err := tpd.Init(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(fixturePolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := tpd.Listen("127.0.0.1:0", true) // a port free on UDP too, for QUIC
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = ln.Addr().String()
	d, err := tpd.New(context.Background(), cfg, nil, tpd.WithResolver(dns.Resolver()))
	if err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	d.Ready = func() { close(ready) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		d.Close()
	})
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("Serve: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("tpd did not open its listeners within 30s")
	}

	f := &fixture{addr: cfg.Listen, certs: map[string]*tls.Certificate{"nocert": nil}}
	url := cfg.PublicURL()
	for _, user := range []string{"alice", "bob", "carol"} {
		c := enroll(t, d, url, user, "laptop")
		cert, err := c.Certificate(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		f.certs[user] = cert
		if f.roots == nil {
			f.roots = x509.NewCertPool()
			f.roots.AddCert(c.Root)
		}
	}
	// carol's certificate stays valid, but her device is revoked.
	if err := d.Users().RevokeDevice("carol@laptop"); err != nil {
		t.Fatal(err)
	}
	f.certs["revoked"] = f.certs["carol"]
	delete(f.certs, "carol")
	// A device certificate shaped like TP's, from a CA the server does not know.
	other := testpki.New(t).ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	f.certs["otherca"] = &other

	_, port, _ := net.SplitHostPort(cfg.Listen)
	serverPort, _ := strconv.Atoi(port)
	f.vars = Vars{
		"echo_host":        "127.0.0.1",
		"echo_tcp_port":    portOf(tcpEcho(t)),
		"echo_udp_port":    portOf(udpEcho(t)),
		"reset_tcp_port":   portOf(tcpResetter(t)),
		"closed_tcp_port":  portOf(closedPort(t)),
		"server_port":      serverPort,
		"echo_name":        "echo.conf.test",
		"missing_name":     "missing.conf.test",
		"zone":             cfg.ReverseZone,
		"alice_id":         "alice@laptop",
		"hello_timeout_ms": int(helloTimeout / time.Millisecond),
	}
	return f
}

// enroll enrolls user@device and logs in through the server's CA, as dlogin does.
func enroll(t *testing.T, d *tpd.Daemon, url, user, device string) *clients.Client {
	t.Helper()
	ctx := context.Background()
	enr, err := d.Users().Enroll(user, device, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	root, err := login.FetchRoot(ctx, url, d.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	home := clients.Home{Dir: filepath.Join(t.TempDir(), "home-"+user)}
	if err := home.Init(); err != nil {
		t.Fatal(err)
	}
	key, err := clients.NewDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	res, err := login.EnrollDevice(ctx, login.HTTPClient(root), url, enr.Token, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(home.SaveDeviceKey(key), home.SaveRoot(root),
		home.SaveProfile(clients.Profile{Server: url, Fingerprint: d.Fingerprint(), DeviceID: res.DeviceID})); err != nil {
		t.Fatal(err)
	}
	c, err := clients.Open(home)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Login(ctx, nil); err != nil {
		t.Fatal(err)
	}
	return c
}

func portOf(a net.Addr) int {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		panic(err)
	}
	return int(ap.Port())
}

// tcpEcho echoes every connection and closes its side when the client's ends.
func tcpEcho(t *testing.T) net.Addr {
	return tcpServer(t, func(c net.Conn) {
		_, _ = io.Copy(c, c)
		_ = c.(*net.TCPConn).CloseWrite()
	})
}

// tcpResetter resets every connection once its first byte arrived.
func tcpResetter(t *testing.T) net.Addr {
	return tcpServer(t, func(c net.Conn) {
		_ = c.SetReadDeadline(time.Now().Add(readTimeout))
		var b [1]byte
		_, _ = c.Read(b[:])
		_ = c.(*net.TCPConn).SetLinger(0) // close sends RST
	})
}

func tcpServer(t *testing.T, serve func(net.Conn)) net.Addr {
	return net.TCPAddrFromAddrPort(netip.MustParseAddrPort(testnet.Serve(t, func(c *net.TCPConn) { serve(c) })))
}

// closedPort is a loopback TCP port where nothing listens, held so for the
// test's life (testnet.Refusing): a port only closed again could be taken by
// another test process meanwhile, and the refused dial then connected (seen
// under load).
func closedPort(t *testing.T) net.Addr {
	return net.TCPAddrFromAddrPort(netip.MustParseAddrPort(testnet.Refusing(t)))
}

// udpEcho answers every datagram with the same bytes.
func udpEcho(t *testing.T) net.Addr {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
	return pc.LocalAddr()
}
