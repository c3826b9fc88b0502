package e2e

import (
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

const reverseUDPPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "listen"
	input.identity.user == "alice"
}

allow if {
	input.action == "expose_public"
	input.identity.user == "alice"
	input.destination.network == "udp"
}

allow if {
	input.action == "dial_udp"
	input.destination.reverse == "dns"
	input.identity.user == "bob"
}
`

// UDP through `tp expose --udp` with the real binaries, over QUIC and TLS: bob
// reaches alice's protected UDP service with `tp forward --udp` to its reverse
// name (end to end), and anyone reaches her public one on a UDP port of tpd.
func TestReverseUDP(t *testing.T) {
	parallel(t)
	port := testnet.FreePort(t, "udp")
	srv := startServer(t, reverseUDPPolicy, "TP_PUBLIC_PORTS="+strconv.Itoa(port)+"/udp")
	echo := testnet.EchoUDP(t)
	alice := srv.login(t, "alice", "laptop")
	bob := srv.login(t, "bob", "phone")
	for _, tr := range []string{"quic", "tls"} {
		t.Run(tr, func(t *testing.T) {
			env := "TP_TRANSPORT=" + tr
			startExpose(t, append(alice, env), "dns", echo, "--udp", "--allow-user", "bob")
			pub := startExpose(t, append(alice, env), "game", echo, "--udp", "--public", strconv.Itoa(port))
			waitLog(t, pub, "Public: anyone reaches UDP", 10*time.Second)

			fwd, _ := startForward(t, append(bob, env), "dns.rev.tp.internal:53", "--udp")
			udpEchoE2E(t, fwd, "protected query over "+tr)
			udpEchoE2E(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), "public datagram over "+tr)
		})
	}
}

// udpEchoE2E sends msg to addr and waits for it to come back, resending a lost
// datagram every 2s up to 10 times.
func udpEchoE2E(t *testing.T, addr, msg string) {
	t.Helper()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 2048)
	for i := 0; ; i++ {
		c.Write([]byte(msg))
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := c.Read(buf)
		if err == nil {
			if string(buf[:n]) != msg {
				t.Fatalf("echo through %s: %q, want %q", addr, buf[:n], msg)
			}
			return
		}
		if i == 10 {
			t.Fatalf("no UDP echo through %s: %v", addr, err)
		}
	}
}
