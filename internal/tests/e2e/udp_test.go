package e2e

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// udpPolicy lets alice send UDP to loopback; bob may dial TCP only.
const udpPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "dial_udp"
	input.identity.user == "alice"
	input.destination.host == "127.0.0.1"
}

allow if {
	input.action == "dial"
	input.destination.host == "127.0.0.1"
}

reason := sprintf("UDP to %s:%d is limited to alice (you: %s)", [
	input.destination.host, input.destination.port, input.identity.device_id,
]) if not allow
`

// `tp forward --udp` through a real tpd, over QUIC (datagrams) and TLS: a UDP
// echo answers through the forward; bob's forward is refused by the policy with
// its reason in tp's log.
func TestForwardUDP(t *testing.T) {
	parallel(t)
	srv := startServer(t, udpPolicy)
	echo := testnet.EchoUDP(t)
	for _, tr := range []string{"quic", "tls"} {
		t.Run(tr, func(t *testing.T) {
			env := append(srv.login(t, "alice", "laptop-"+tr), "TP_TRANSPORT="+tr)
			fwd, _ := startForward(t, env, echo, "--udp")
			c, err := net.Dial("udp", fwd)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, 2048)
			for i := 0; ; i++ { // UDP: retry a lost datagram a few times
				c.Write([]byte("dns-ish query"))
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				n, err := c.Read(buf)
				if err == nil {
					if string(buf[:n]) != "dns-ish query" {
						t.Fatalf("echo %q", buf[:n])
					}
					break
				}
				if i == 10 {
					t.Fatalf("no UDP echo through tp forward --udp: %v", err)
				}
			}
		})
	}
	t.Run("denied", func(t *testing.T) {
		env := srv.login(t, "bob", "phone")
		fwd, log := startForward(t, env, echo, "--udp")
		c, err := net.Dial("udp", fwd)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("query"))
		waitLog(t, log, "UDP to 127.0.0.1", 30*time.Second)
		if !strings.Contains(log.String(), "denied by policy") || !strings.Contains(log.String(), "limited to alice (you: bob@phone)") {
			t.Fatalf("refusal not explained:\n%s", log.String())
		}
	})
}
