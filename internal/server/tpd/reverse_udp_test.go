package tpd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// udpPolicy lets alice register names and expose UDP port %[1]d publicly, and
// lets bob and dave dial the UDP name "dns".
const udpPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user == "alice"
}

allow if {
	input.action == "expose_public"
	input.identity.user == "alice"
	input.destination.network == "udp"
	input.destination.port == %[1]d
}

allow if {
	input.action in {"dial_udp", "dial"}
	input.destination.reverse in {"dns", "game"}
	input.identity.user in {"bob", "dave"}
}
`

// udpExchange sends msg on c and waits for its answer from the upper-casing
// service, resending every 500ms (UDP may drop; the test's bound is 20s). An
// answer to an earlier datagram is skipped: a datagram resent after a slow
// answer is answered twice, and its second answer arrives after the next one is
// sent.
func udpExchange(t *testing.T, c net.Conn, msg []byte) []byte {
	t.Helper()
	want := bytes.ToUpper(msg)
	buf := make([]byte, 65535)
	var other []byte
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("sending %d bytes: %v", len(msg), err)
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		for {
			n, err := c.Read(buf)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				break
			}
			if err != nil {
				t.Fatalf("reading the answer to %d bytes: %v", len(msg), err)
			}
			if bytes.Equal(buf[:n], want) {
				return append([]byte(nil), buf[:n]...)
			}
			other = append(other[:0], buf[:n]...)
		}
	}
	t.Fatalf("no answer to %d bytes within 20s (the last other datagram: %d bytes %.40q)", len(msg), len(other), other)
	return nil
}

// Public UDP mode over both carriers: anyone reaches alice's UDP service on a UDP
// port of tpd, each public client (source address) in its own session; large
// datagrams arrive whole; a port outside public-ports for UDP, or one the policy
// does not allow for UDP, is refused; the port closes when the agent stops.
func TestReversePublicUDP(t *testing.T) {
	t.Parallel()
	port, tcpOnly := testnet.FreePort(t, "udp"), testnet.FreePort(t, "udp")
	d, url := startDaemonCfg(t, fmt.Sprintf(udpPolicy, port), func(c *config.Server) {
		c.PublicPorts = fmt.Sprintf("%d/udp, %d/tcp", port, tcpOnly)
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	local := testnet.UpperUDP(t)
	game := func(p int) []clients.Exposed {
		return []clients.Exposed{{Name: "game", Local: local, UDP: true, PublicPort: p}}
	}
	public := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			stop, err := runAgent(t, alice, transport, game(port), nil)
			if err != nil {
				t.Fatal(err)
			}
			before := d.proxy.UDPStats()
			var wg sync.WaitGroup
			for i := range 3 { // three public clients at once, each its own session
				wg.Add(1)
				go func() {
					defer wg.Done()
					c, err := net.Dial("udp", public)
					if err != nil {
						t.Error(err)
						return
					}
					defer c.Close()
					for j := range 5 {
						msg := []byte(fmt.Sprintf("client-%d-datagram-%d-%s", i, j, transport))
						if got := udpExchange(t, c, msg); !bytes.Equal(got, bytes.ToUpper(msg)) {
							t.Errorf("client %d got %q for %q", i, got, msg)
						}
					}
					// Larger than any QUIC DATAGRAM frame: it takes the stream, whole.
					big := bytes.Repeat([]byte("x"), 60000)
					if got := udpExchange(t, c, big); !bytes.Equal(got, bytes.ToUpper(big)) {
						t.Errorf("client %d: a 60000-byte datagram came back as %d bytes", i, len(got))
					}
				}()
			}
			wg.Wait()
			stop()
			// The port is closed: tpd no longer holds it, so the test can bind it.
			waitUDPFree(t, port)
			// Its sessions end (with the agent's control session) and are counted.
			deadline := time.Now().Add(20 * time.Second)
			for d.proxy.UDPStats().Active != 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond) // polling for the sessions to end, bounded by the deadline
			}
			st := d.proxy.UDPStats()
			if st.Flows-before.Flows < 3 || st.DatagramsUp-before.DatagramsUp < 18 || st.Active != 0 {
				t.Errorf("public UDP counters before %+v, after %+v; want 3 sessions, 18 datagrams up, none active", before, st)
			}
			// Over QUIC, once the agent answered, datagrams travel in DATAGRAM
			// frames; the 60000-byte ones fit none and took the stream.
			if oversize := st.Oversize - before.Oversize; transport == clients.TransportQUIC && oversize < 3 || transport == clients.TransportTLS && oversize != 0 {
				t.Errorf("datagrams sent on the stream for want of a DATAGRAM frame: %d over %s", oversize, transport)
			}
		})
	}
	_, err := runAgent(t, alice, clients.TransportTLS, game(tcpOnly), nil)
	wantRefused(t, err, wire.CodePublicRefused, "public-ports")
	_, err = runAgent(t, alice, clients.TransportTLS, []clients.Exposed{{Name: "game", Local: local, UDP: true, PublicPort: port, PublicSNI: "x.example.test"}}, nil)
	if err == nil || !strings.Contains(err.Error(), "UDP service is exposed on a public port") {
		t.Fatalf("UDP by server name: %v; want the agent's refusal", err)
	}
}

func waitUDPFree(t *testing.T, port int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		pc, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			pc.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("UDP port %d is still held: %v", port, err)
		}
		time.Sleep(20 * time.Millisecond) // polling for a state change, bounded by the deadline
	}
}

// Protected UDP over both carriers: bob dials alice's UDP name with net "udp"
// (as tp forward --udp does); the datagrams travel inside the end-to-end TLS
// session, so the relay never sees them; dave passes the policy but not the
// agent's allow list; a TCP dial of the UDP name is refused with a hint.
func TestReverseProtectedUDP(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, fmt.Sprintf(udpPolicy, 1))
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	dave, _, _ := enrollClient(t, d, url, "dave", "pc")
	local := testnet.UpperUDP(t)
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			tap := &capture{}
			_, err := runAgent(t, alice, transport, []clients.Exposed{{Name: "dns", Local: local, UDP: true}}, tap)
			if err != nil {
				t.Fatal(err)
			}
			dial := func(c *clients.Client, network string) (net.Conn, error) {
				dl, err := c.Dialer()
				if err != nil {
					t.Fatal(err)
				}
				dl.Transport = transport
				t.Cleanup(func() { dl.Close() })
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				return dl.DialContext(ctx, network, "dns.rev.tp.internal:53")
			}
			conn, err := dial(bob, "udp")
			if err != nil {
				t.Fatalf("bob: %v", err)
			}
			defer conn.Close()
			for i := range 5 {
				msg := []byte(fmt.Sprintf("plaintext-marker-%s-%d", transport, i))
				if got := udpExchange(t, conn, msg); !bytes.Equal(got, bytes.ToUpper(msg)) {
					t.Fatalf("bob got %q for %q", got, msg)
				}
			}
			if tap.size() == 0 {
				t.Fatal("the capture saw nothing: the test does not observe the relay")
			}
			if tap.contains([]byte("plaintext-marker")) || tap.contains([]byte("PLAINTEXT-MARKER")) {
				t.Fatal("the relay forwarded a datagram in plaintext")
			}
			_, err = dial(dave, "udp") // allowed by the relay's policy, not by the agent (-allow-user bob)
			var re *clients.RefusedError
			if !errors.As(err, &re) || re.Code != clients.CodeAgentDenied {
				t.Fatalf("dave: %v; want the agent's refusal", err)
			}
			_, err = dial(bob, "tcp")
			if !errors.As(err, &re) || re.Code != wire.CodeUnsupportedNetwork || !strings.Contains(err.Error(), "--udp") {
				t.Fatalf("a TCP dial of the UDP name: %v; want %s with a hint", err, wire.CodeUnsupportedNetwork)
			}
		})
	}
}

// Bad input on a public UDP port: more public clients than udp-max-public-flows.
// The extra client's datagrams are dropped and counted while the port is full,
// the served clients are unaffected, and once a session idles out the extra
// client is served.
func TestReversePublicUDPBounds(t *testing.T) {
	t.Parallel()
	port := testnet.FreePort(t, "udp")
	d, url := startDaemonCfg(t, fmt.Sprintf(udpPolicy, port), func(c *config.Server) {
		c.PublicPorts = fmt.Sprintf("%d/udp", port)
		c.UDPMaxPublicFlows = 2
		c.UDPIdleTimeout = time.Second
	})
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	if _, err := runAgent(t, alice, clients.TransportQUIC, []clients.Exposed{{Name: "game", Local: testnet.UpperUDP(t), UDP: true, PublicPort: port}}, nil); err != nil {
		t.Fatal(err)
	}
	public := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	dial := func() net.Conn {
		c, err := net.Dial("udp", public)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	a, b, extra := dial(), dial(), dial()
	udpExchange(t, a, []byte("a"))
	udpExchange(t, b, []byte("b"))
	before := d.proxy.UDPStats()
	// The port is full: the extra client gets no answer (it is not served while
	// a and b keep their sessions busy) and its datagrams are counted.
	buf := make([]byte, 100)
	for i := range 5 {
		extra.Write([]byte("extra"))
		udpExchange(t, a, []byte("a again")) // a and b stay served, and not idle
		udpExchange(t, b, []byte("b again"))
		_ = extra.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, err := extra.Read(buf); err == nil {
			t.Fatalf("datagram %d of a client beyond the bound was answered: %q", i, buf[:n])
		}
	}
	if refused := d.proxy.UDPStats().FlowsRefused - before.FlowsRefused; refused < 5 {
		t.Errorf("datagrams of the extra client counted as refused: %d, want 5", refused)
	}
	// a and b fall silent and their sessions end after the 1s idle timeout;
	// then the extra client is served.
	if got := udpExchange(t, extra, []byte("extra later")); string(got) != "EXTRA LATER" {
		t.Fatalf("extra client after the idle timeout: %q", got)
	}
}
