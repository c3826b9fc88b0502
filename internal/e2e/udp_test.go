package e2e

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testnet"
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
	srv := startServer(t, udpPolicy)
	echo := testnet.EchoUDP(t)
	for _, tr := range []string{"quic", "tls"} {
		t.Run(tr, func(t *testing.T) {
			env := append(srv.login(t, "alice", "laptop-"+tr), "TP_TRANSPORT="+tr)
			fwd, _ := startForwardUDP(t, env, echo)
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
		fwd, log := startForwardUDP(t, env, echo)
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

// startForwardUDP runs `tp forward --udp 127.0.0.1:0 target` and returns the
// local UDP address and tp's stderr.
func startForwardUDP(t *testing.T, env []string, target string) (string, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(binary("tp"), "forward", "--udp", "127.0.0.1:0", target)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	log := &syncBuffer{}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("tp forward --udp log:\n%s", log.String())
		}
	})
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		re := regexp.MustCompile(`^Forwarding UDP (\S+) to`)
		for sc.Scan() {
			log.Write([]byte(sc.Text() + "\n"))
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				addr <- m[1]
			}
		}
	}()
	select {
	case a := <-addr:
		return a, log
	case <-time.After(60 * time.Second):
		t.Fatalf("tp forward --udp did not start:\n%s", log.String())
	}
	return "", nil
}
