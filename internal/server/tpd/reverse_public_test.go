package tpd

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/website"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// publicPolicy lets alice and mallory register names, expose TCP port %[1]d and
// (alice only) the server name blog.example.test.
const publicPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user in {"alice", "mallory"}
}

allow if {
	input.action == "expose_public"
	input.identity.user in {"alice", "mallory"}
	input.destination.network == "tcp"
	input.destination.port == %[1]d
}

allow if {
	input.action == "expose_public"
	input.identity.user == "alice"
	input.destination.host == "blog.example.test"
}
`

// runAgent runs an agent for exposed and waits until it registered; an agent
// the server refuses returns its error instead (ExitOnRefusal: these tests probe
// the server's refusals, which an agent otherwise retries).
func runAgent(t *testing.T, c *clients.Client, transport string, exposed []clients.Exposed, tap *capture) (stop func(), err error) {
	t.Helper()
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	d.Transport = transport
	registered := make(chan struct{}, 10)
	a := &clients.Agent{Dialer: d, Exposed: exposed, AllowUsers: []string{"bob"}, Certificate: c.ReverseCertificate,
		Registered: func([]string) { notify(registered) }, ExitOnRefusal: true}
	if tap != nil {
		a.WrapData = tap.wrap
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- a.Run(ctx); d.Close() }()
	select {
	case <-registered:
	case err := <-errc:
		cancel()
		return nil, err
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
	return stop, nil
}

// roundTrip sends msg on c, half-closes and reads the answer to its end.
func roundTrip(c net.Conn, msg []byte) ([]byte, error) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}

// waitRefused polls until nothing listens on addr any more.
func waitRefused(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if errors.Is(err, syscall.ECONNREFUSED) {
			return
		}
		if err == nil {
			c.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still accepts connections", addr)
		}
		time.Sleep(20 * time.Millisecond) // polling for a state change, bounded by the deadline
	}
}

func wantRefused(t *testing.T, err error, code, text string) {
	t.Helper()
	var re *clients.RefusedError
	if !errors.As(err, &re) || re.Code != code || !strings.Contains(err.Error(), text) {
		t.Fatalf("got %v; want refusal %s containing %q", err, code, text)
	}
}

// Public TCP mode over both carriers: anyone reaches the agent's local service on
// a port of tpd, with no inner TLS; ports outside public-ports, ports the policy
// does not allow and a port held by another identity are refused; the port closes
// when the agent unregisters, and after the grace period when it drops off.
func TestReversePublicTCP(t *testing.T) {
	t.Parallel()
	port, denied, outside := testnet.FreePort(t, "tcp"), testnet.FreePort(t, "tcp"), testnet.FreePort(t, "tcp")
	d, url := startDaemonCfg(t, fmt.Sprintf(publicPolicy, port), func(c *config.Server) {
		c.PublicPorts = fmt.Sprintf("%d, %d", port, denied)
		c.ReverseGrace = 2 * time.Second
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	mallory, _, _ := enrollClient(t, d, url, "mallory", "pc")
	local := testnet.Upper(t)
	public := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	game := func(p int) []clients.Exposed {
		return []clients.Exposed{{Name: "game", Local: local, PublicPort: p}}
	}
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			stop, err := runAgent(t, alice, transport, game(port), nil)
			if err != nil {
				t.Fatal(err)
			}
			for i := range 3 {
				c, err := net.Dial("tcp", public)
				if err != nil {
					t.Fatal(err)
				}
				msg := []byte(fmt.Sprintf("public-%s-%d", transport, i))
				got, err := roundTrip(c, msg)
				if err != nil || !bytes.Equal(got, bytes.ToUpper(msg)) {
					t.Fatalf("public client: %q, %v", got, err)
				}
			}
			// Another identity cannot take the port (under another name, too).
			_, err = runAgent(t, mallory, clients.TransportTLS, []clients.Exposed{{Name: "other", Local: local, PublicPort: port}}, nil)
			wantRefused(t, err, wire.CodeNameTaken, fmt.Sprintf("public TCP port %d is registered by another identity", port))
			stop() // Ctrl-C unregisters: the port closes at once
			waitRefused(t, public)
		})
	}

	_, err := runAgent(t, alice, clients.TransportTLS, game(outside), nil)
	wantRefused(t, err, wire.CodePublicRefused, "public-ports")
	_, err = runAgent(t, alice, clients.TransportTLS, game(denied), nil)
	wantRefused(t, err, wire.CodePolicyDenied, fmt.Sprintf("to expose game on public TCP port %d", denied))

	// The agent drops off without unregistering: the port stays alice's for the
	// grace period (connections are reset, mallory is refused), then closes.
	ad, _ := alice.Dialer()
	cfg := ad.TLSConfig.Clone()
	cfg.NextProtos, cfg.ServerName = []string{wire.ALPN}, "localhost"
	raw, err := tls.Dial("tcp", ad.Server, cfg)
	if err != nil {
		t.Fatal(err)
	}
	hello := wire.ClientHello{V: 1, Op: wire.OpListen, Net: "tcp", Names: []string{"game"},
		Public: []wire.PublicSpec{{Name: "game", Net: "tcp", Port: port}}}
	if err := wire.WriteClientHello(raw, hello); err != nil {
		t.Fatal(err)
	}
	if sh, err := wire.ReadServerHello(raw); err != nil || !sh.OK {
		t.Fatalf("alice's raw listen: %+v %v", sh, err)
	}
	raw.NetConn().Close()
	refusedWhileReconnecting(t, func() error {
		_, err := runAgent(t, mallory, clients.TransportTLS, []clients.Exposed{{Name: "other", Local: local, PublicPort: port}}, nil)
		return err
	})
	waitRefused(t, public) // after the 2s grace
	stop, err := runAgent(t, mallory, clients.TransportTLS, []clients.Exposed{{Name: "other", Local: local, PublicPort: port}}, nil)
	if err != nil {
		t.Fatalf("mallory after alice's grace ran out: %v", err)
	}
	stop()
}

// Public HTTPS by SNI: TLS for blog.example.test passes through tpd untouched
// and ends at the agent, with the agent's own certificate (one the test makes);
// tpd's own names, names under the reverse zone and names the policy does not
// allow are refused; the name stops routing when the agent stops.
func TestReversePublicSNI(t *testing.T) {
	t.Parallel()
	d, url := startDaemonCfg(t, fmt.Sprintf(publicPolicy, 1), func(c *config.Server) { c.Names = append(c.Names, "tp.example.test") })
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	ca := testpki.New(t)
	siteCert := ca.ServerCert(t, "blog.example.test")
	local := testnet.Upper(t)
	addr := hostPort(t, url)
	blog := func(sni string) []clients.Exposed {
		return []clients.Exposed{{Name: "blog", Local: local, PublicSNI: sni,
			TLS: &tls.Config{Certificates: []tls.Certificate{siteCert}}}}
	}
	dialBlog := func() (*tls.Conn, error) {
		return tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr,
			&tls.Config{ServerName: "blog.example.test", RootCAs: ca.Pool, NextProtos: []string{"h2", "http/1.1"}})
	}
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			stop, err := runAgent(t, alice, transport, blog("blog.example.test"), nil)
			if err != nil {
				t.Fatal(err)
			}
			c, err := dialBlog()
			if err != nil {
				t.Fatalf("TLS through the pass-through: %v", err)
			}
			if got := c.ConnectionState().PeerCertificates[0].Subject.CommonName; got != "blog.example.test" {
				t.Fatalf("the client saw certificate %q, not the agent's", got)
			}
			msg := []byte("GET / over " + transport)
			got, err := roundTrip(c, msg)
			if err != nil || !bytes.Equal(got, bytes.ToUpper(msg)) {
				t.Fatalf("through the pass-through: %q, %v", got, err)
			}
			stop()
			if c, err := dialBlog(); err == nil {
				c.Close()
				t.Fatal("the name still reaches something after the agent stopped")
			}
		})
	}
	for sni, want := range map[string][2]string{
		"localhost":          {wire.CodeBadRequest, "at least two labels"},
		"tp.example.test":    {wire.CodePublicRefused, "one of the TP server's own names"},
		"x.rev.tp.internal":  {wire.CodePublicRefused, "under the reverse zone"},
		"other.example.test": {wire.CodePolicyDenied, "other.example.test"},
	} {
		_, err := runAgent(t, alice, clients.TransportTLS, blog(sni), nil)
		wantRefused(t, err, want[0], want[1])
	}
}

// The refusals of SNI pass-through names: tpd's own names and websites.
func TestPublicSNIAllowed(t *testing.T) {
	t.Parallel()
	d := &Daemon{cfg: config.DefaultServer()}
	h, err := website.New(website.Options{Sites: []website.Site{{Name: "www.test", Root: t.TempDir()}}, OwnNames: []string{"tp.test"}, Own: http.NotFoundHandler()})
	if err != nil {
		t.Fatal(err)
	}
	d.web.handler.Store(h)
	for name, want := range map[string]string{"tp.test": "own names", "www.test": "website", "blog.test": ""} {
		err := d.publicSNIAllowed(name)
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("%s: %v; want %q", name, err, want)
		}
	}
}

// An agent that dies mid-transfer in public mode: the public client sees a TCP
// reset, never a clean end — whether the agent's TLS data connection ends
// without close_notify or its QUIC stream is reset.
func TestReversePublicAgentDies(t *testing.T) {
	t.Parallel()
	port := testnet.FreePort(t, "tcp")
	d, url := startDaemonCfg(t, fmt.Sprintf(publicPolicy, port), func(c *config.Server) { c.PublicPorts = strconv.Itoa(port) })
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	stream := testnet.Stream(t) // a service that streams forever
	for _, transport := range []string{clients.TransportTLS, clients.TransportQUIC} {
		t.Run(transport, func(t *testing.T) {
			tap := &capture{}
			stop, err := runAgent(t, alice, transport, []clients.Exposed{{Name: "game", Local: stream, PublicPort: port}}, tap)
			if err != nil {
				t.Fatal(err)
			}
			defer stop()
			c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.CopyN(io.Discard, c, 1<<20); err != nil {
				t.Fatal(err)
			}
			tap.mu.Lock()
			for _, rc := range tap.raw { // the agent's side is cut, without a clean end
				switch v := rc.(type) {
				case *tls.Conn:
					v.NetConn().Close()
				default:
					wire.Abort(v, wire.QUICPeerReset)
				}
			}
			tap.mu.Unlock()
			_, err = io.Copy(io.Discard, c)
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("the public client saw %v; want a connection reset", err)
			}
		})
	}
}

func hostPort(t *testing.T, rawURL string) string {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	return u.Host
}
