package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// transferIn downloads a transfer of size bytes from S to C through the
// tunnel and checks its checksum.
func transferIn(t *testing.T, n *ipNet, size int, what string) {
	t.Helper()
	addr, want := serveBytes(t, n, size)
	c := dialIn(t, n.C, addr)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Minute))
	h := sha256.New()
	if _, err := io.Copy(h, c); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if got := [32]byte(h.Sum(nil)); got != want {
		t.Fatalf("%s: checksum %x, want %x", what, got, want)
	}
}

// transferOut uploads size random bytes from C to S through the tunnel and
// checks what S received against their checksum.
func transferOut(t *testing.T, n *ipNet, size int, what string) {
	t.Helper()
	data := make([]byte, size)
	_, _ = rand.Read(data)
	ln := listenOnS(t, n)
	got := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Minute))
		h := sha256.New()
		_, _ = io.Copy(h, c)
		got <- [32]byte(h.Sum(nil))
	}()
	c := dialIn(t, n.C, ln.Addr().String())
	_ = c.SetWriteDeadline(time.Now().Add(2 * time.Minute))
	if _, err := c.Write(data); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	_ = c.(*net.TCPConn).CloseWrite()
	select {
	case sum := <-got:
		if sum != sha256.Sum256(data) {
			t.Fatalf("%s: the service host received other bytes", what)
		}
	case <-time.After(3 * time.Minute):
		t.Fatalf("%s: the service host did not receive the whole upload", what)
	}
}

// waitTPIP waits until cond holds for tp ip's log, or fails.
func waitTPIP(t *testing.T, log interface{ String() string }, what string, cond func(string) bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond(log.String()) {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s; tp ip:\n%s", what, log.String())
		}
		time.Sleep(50 * time.Millisecond) // polling, bounded by the deadline
	}
}

// Path-MTU discovery through the tunnel: both tun devices have an MTU of 9000
// (tpd's ip-mtu and tp ip --mtu), more than any QUIC datagram, so full-sized
// TCP segments from the service host (1500-byte veth) do not fit. tpd answers
// them with ICMP "fragmentation needed" carrying the size that fits, the
// service host's TCP lowers its segments, and a 4 MiB transfer with DF set (as
// Linux sets it on TCP) completes with the right checksum. TCP rides the
// datagrams here (--tcp-in-datagrams), as UDP always does: on the request
// stream a packet's size is not bound by the datagram's.
func TestIPTunnelTPIPPathMTU(t *testing.T) {
	parallel(t)
	n, env, _ := startIPE2E(t, "TP_IP_MTU=9000")
	tpip := startTPIP(t, n.C, env, "--mtu", "9000", "--tcp-in-datagrams")
	// First the upload (before S learns a path MTU that would shrink the MSS
	// it advertises): tp ip answers the client host's own 1500-byte segments
	// with ICMP towards the local sender, and an upload completes too.
	transferOut(t, n, 4<<20, "the upload through tun devices of MTU 9000")
	if route := sh(t, "ip", "-n", n.C, "route", "get", "10.201.2.2"); !regexp.MustCompile(`mtu 1[0-4]\d\d`).MatchString(route) {
		t.Fatalf("the client host's route to the service host has no path MTU learnt from tp ip's ICMP: %s", route)
	}
	// Forget it, so that the client host's SYN advertises the MSS of its tun
	// MTU again and the service host sends full 1500-byte segments.
	sh(t, "ip", "-n", n.C, "route", "flush", "cache")
	transferIn(t, n, 4<<20, "the transfer through tun devices of MTU 9000")
	m := scrapeIn(t, n.T, "http://127.0.0.1:9464/metrics")
	tooBig := regexp.MustCompile(`(?m)^tp_ip_packets_dropped_total\{reason="too_big"\} ([1-9]\d*)$`).FindStringSubmatch(m)
	if tooBig == nil {
		t.Fatalf("tpd counted no too_big drop (so sent no ICMP), yet segments of 1500 bytes cannot fit its datagrams:\n%s\ntp ip:\n%s", m, tpip.String())
	}
	t.Logf("too_big drops answered with ICMP: %s", tooBig[1])
	// The service host learnt the path MTU towards the device from tpd's ICMP.
	if route := sh(t, "ip", "-n", n.S, "route", "get", "100.96.0.1"); !regexp.MustCompile(`mtu 1[0-4]\d\d`).MatchString(route) {
		t.Fatalf("the service host's route to the device has no learnt path MTU: %s", route)
	}
}

// tpd restarts under a live `tp ip`: it reconnects with backoff, reports the
// tunnel up again, and ping and a transfer each way work again. This tunnel
// runs with --no-segments: its TCP segments cross the stream cut into
// packets (DATAGRAM capsules, as RFC 9484 peers send them), none whole.
func TestIPTunnelTPIPReconnectsAfterRestart(t *testing.T) {
	parallel(t)
	n, env, _ := startIPE2E(t)
	tpip := startTPIP(t, n.C, env, "--no-segments")
	if !strings.Contains(tpip.String(), "tcp_on_stream=true tcp_segments=false") {
		t.Fatalf("tp ip --no-segments did not run with TCP on the stream in packets:\n%s", tpip.String())
	}
	if _, err := ping(t, n.C, "10.201.2.2"); err != nil {
		t.Fatalf("ping before the restart: %v", err)
	}
	old := n.tpd
	_ = old.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-old.done:
	case <-time.After(30 * time.Second):
		t.Fatal("tpd did not stop within 30s of SIGTERM")
	}
	waitTPIP(t, tpip, "tp ip to notice the lost tunnel", func(s string) bool { return strings.Contains(s, "IP tunnel lost; reconnecting") })
	n.tpd = startTPDIn(t, n.T, old.DataDir, old.Addr, n.tpdEnv)
	waitTPIP(t, tpip, "the tunnel to come up again", func(s string) bool { return strings.Count(s, "IP tunnel up on ") >= 2 })
	if _, err := ping(t, n.C, "10.201.2.2"); err != nil {
		t.Fatalf("ping after tpd restarted: %v\ntp ip:\n%s", err, tpip.String())
	}
	transferIn(t, n, 4<<20, "the download after tpd restarted")
	transferOut(t, n, 4<<20, "the upload after tpd restarted")
	// The restarted tpd's counters: 4 MiB each way in packets of at most
	// 1,240 bytes of data on the stream (3,383 each way), no segment whole.
	m := ipPacketCounts(t, n)
	for _, dir := range []string{"up", "down"} {
		if m["stream "+dir] < 3383 || m["segments "+dir] != 0 {
			t.Errorf("%s: %v packets on the stream (want at least 3,383), %v segments whole (want 0)", dir, m["stream "+dir], m["segments "+dir])
		}
	}
}

// Where UDP to tpd is dropped (iptables in the client host), `tp ip` with the
// default --transport auto falls back to HTTP/2 over TLS and the tunnel works.
func TestIPTunnelTPIPFallsBackWhenUDPIsBlocked(t *testing.T) {
	parallel(t)
	n, env, _ := startIPE2E(t)
	sh(t, "ip", "netns", "exec", n.C, "iptables", "-w", "-A", "OUTPUT", "-p", "udp", "-j", "DROP")
	tpip := startTPIP(t, n.C, env)
	if !strings.Contains(tpip.String(), "over=HTTP/2") {
		t.Fatalf("tp ip did not fall back to HTTP/2 with UDP blocked:\n%s", tpip.String())
	}
	if _, err := ping(t, n.C, "10.201.2.2"); err != nil {
		t.Fatalf("ping over the HTTP/2 fallback: %v", err)
	}
	transferIn(t, n, 4<<20, "the transfer over the HTTP/2 fallback")
}

// `tpd revoke` of the device under a live `tp ip` (over HTTP/3 and over
// HTTP/2): the tunnel ends, and tp ip exits (no retrying forever) with a
// sentence saying the device was revoked and what to do.
func TestIPTunnelTPIPRevoked(t *testing.T) {
	parallel(t)
	for _, transport := range []string{"auto", "tls"} {
		t.Run(transport, func(t *testing.T) { testIPTunnelTPIPRevoked(t, transport) })
	}
}

func testIPTunnelTPIPRevoked(t *testing.T, transport string) {
	n, env, _ := startIPE2E(t)
	tpip, exited := startTPIPProc(t, n.C, env, "--transport", transport)
	if _, err := ping(t, n.C, "10.201.2.2"); err != nil {
		t.Fatalf("ping before the revocation: %v", err)
	}
	dev := regexp.MustCompile(`IP tunnel up on (\S+):`).FindStringSubmatch(tpip.String())[1]
	start := time.Now()
	run(t, nil, binary("tpd"), "revoke", "--device", "alice@laptop", "--data-dir", n.tpd.DataDir)
	select {
	case <-exited:
		t.Logf("tp ip exited %s after tpd revoke was started:\n%s", time.Since(start), tpip.String())
	case <-time.After(90 * time.Second):
		t.Fatalf("tp ip still runs 90s after its device was revoked:\n%s", tpip.String())
	}
	out := tpip.String()
	if !strings.Contains(out, "revoked") {
		t.Fatalf("tp ip's last words do not say the device was revoked:\n%s", out)
	}
	// The refusal is seen on the first reconnect (over HTTP/2 too, where the
	// server's alert can be lost to a reset: tp ip then asks the server).
	if n := strings.Count(out, "reconnecting"); n > 1 {
		t.Fatalf("tp ip retried a revoked device %d times:\n%s", n, out)
	}
	if _, err := runErr(nil, nil, "ip", "-n", n.C, "link", "show", "dev", dev); err == nil {
		t.Fatalf("the tun device %s outlived tp ip", dev)
	}
}
