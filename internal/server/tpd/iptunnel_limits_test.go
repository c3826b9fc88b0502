package tpd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	connectip "github.com/quic-go/connect-ip-go"
	"golang.org/x/sys/unix"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// ipPolicy6 grants 10.77.0.0/24 and fd77::/64 (the far side), never
// fd78::/64.
const ipPolicy6 = `package tp.authz

default allow := false

allow if {
	input.action == "ip"
	input.identity.user in {"alice", "bob"}
}

ip := {"routes": ["10.77.0.0/24", "fd77::/64"]} if input.action == "ip"
`

func (c *rawIP) v6() netip.Addr {
	for _, a := range c.addrs {
		if a.Prefix.Addr().Is6() {
			return a.Prefix.Addr()
		}
	}
	return netip.Addr{}
}

// udp6 builds an IPv6 UDP packet (with the checksum IPv6 requires).
func udp6(src, dst netip.AddrPort, data []byte) []byte {
	u := make([]byte, 8+len(data))
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(len(u)))
	copy(u[8:], data)
	pseudo := make([]byte, 0, 40+len(u))
	pseudo = append(pseudo, src.Addr().AsSlice()...)
	pseudo = append(pseudo, dst.Addr().AsSlice()...)
	pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(u)))
	pseudo = append(pseudo, 0, 0, 0, 17)
	pseudo = append(pseudo, u...)
	sum := inetChecksum(pseudo)
	if sum == 0 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], sum)
	p := make([]byte, 40, 40+len(u))
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:], uint16(len(u)))
	p[6], p[7] = 17, 64
	copy(p[8:24], src.Addr().AsSlice())
	copy(p[24:40], dst.Addr().AsSlice())
	return append(p, u...)
}

// readUDP6 is readUDP for IPv6 packets (no extension headers).
func readUDP6(c *rawIP, from netip.AddrPort) ([]byte, error) {
	buf := make([]byte, 65536)
	for {
		n, err := c.ReadPacket(buf)
		if err != nil {
			return nil, err
		}
		p := buf[:n]
		h, err := wire.ParseIPHeader(p)
		if err != nil || h.Proto != 17 || h.Src != from.Addr() || len(p) < 48 || binary.BigEndian.Uint16(p[40:]) != from.Port() {
			continue
		}
		return append([]byte(nil), p[48:]...), nil
	}
}

// udpEcho6 serves UDP echo on an IPv6 address and counts what it received.
func udpEcho6(t *testing.T, addr string) (netip.AddrPort, func() int) {
	t.Helper()
	pc, err := net.ListenPacket("udp6", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	n := make(chan struct{}, 1<<16)
	go func() {
		buf := make([]byte, 65536)
		for {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			n <- struct{}{}
			_, _ = pc.WriteTo(buf[:k], from)
		}
	}()
	return netip.MustParseAddrPort(pc.LocalAddr().String()), func() int { return len(n) }
}

// IPv6 through the tunnel: UDP to a granted IPv6 prefix comes back intact; a
// packet to an IPv6 prefix the policy does not grant is dropped, counted, and
// never reaches the far side.
func TestIPTunnelIPv6(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t) {
		return
	}
	mustIP(t, "addr", "add", "fd77::1/128", "dev", "lo", "nodad")
	mustIP(t, "addr", "add", "fd78::1/128", "dev", "lo", "nodad")
	r := newIPRigPolicy(t, ipPolicy6)
	c := r.dialRaw(t, r.cert)
	addr := c.v6()
	if !netip.MustParsePrefix("fd74:7000::/64").Contains(addr) {
		t.Fatalf("assigned IPv6 address %s, want one of the pool fd74:7000::/64", addr)
	}
	allowed, _ := udpEcho6(t, "[fd77::1]:0")
	denied, deniedGot := udpEcho6(t, "[fd78::1]:0")
	before := r.d.proxy.IPTunnels().Stats()

	// Bad input: a packet to fd78::/64, which the policy does not grant.
	c.send(t, udp6(netip.AddrPortFrom(addr, 40001), denied, []byte("to a denied IPv6 prefix")))
	ipWaitFor(t, "the IPv6 drop to be counted", func() bool {
		return r.d.proxy.IPTunnels().Stats().DroppedDestination > before.DroppedDestination
	})
	for i := range 20 {
		msg := []byte(fmt.Sprintf("IPv6 datagram %d", i))
		c.send(t, udp6(netip.AddrPortFrom(addr, 40002), allowed, msg))
		got, err := readUDP6(c, allowed)
		if err != nil || string(got) != string(msg) {
			t.Fatalf("IPv6 echo %d through the tunnel: %q, %v", i, got, err)
		}
	}
	if n := deniedGot(); n != 0 {
		t.Fatalf("the far side of the denied IPv6 prefix received %d datagrams", n)
	}
}

// A packet from the network larger than the tunnel's QUIC datagrams (the tun
// MTU is 9000 here) is answered with ICMP "fragmentation needed" (IPv4) or
// "packet too big" (IPv6): the sender's kernel learns the path MTU (a second
// send of the same size fails with EMSGSIZE, as path-MTU discovery wants),
// the drop is counted as too_big, and a datagram of the learnt size arrives.
func TestIPTunnelPacketTooBig(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t) {
		return
	}
	mustIP(t, "addr", "add", "fd77::1/128", "dev", "lo", "nodad")
	r := newIPRigPolicy(t, ipPolicy6, func(c *config.Server) { c.IPTunnel.IPMTU = 9000 })
	c := r.dialRaw(t, r.cert)
	for _, tc := range []struct {
		name, network, far string
		client             netip.Addr
		floor, overhead    int
		level, discover    int
		mtuOpt             int
		read               func(netip.AddrPort) ([]byte, error)
	}{
		{"IPv4", "udp4", "10.77.0.1", c.v4(), 576, 28, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_MTU,
			func(from netip.AddrPort) ([]byte, error) { return readUDP(t, c, from) }},
		{"IPv6", "udp6", "fd77::1", c.v6(), 1280, 48, unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_MTU,
			func(from netip.AddrPort) ([]byte, error) { return readUDP6(c, from) }},
	} {
		before := r.d.proxy.IPTunnels().Stats().DroppedTooBig
		conn, err := net.DialUDP(tc.network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(tc.far), 0)),
			net.UDPAddrFromAddrPort(netip.AddrPortFrom(tc.client, 5000)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		rc, _ := conn.SyscallConn()
		sockopt := func(set bool, opt, v int) (got int) {
			var serr error
			_ = rc.Control(func(fd uintptr) {
				if opt == unix.SO_ERROR {
					// The ICMP errors of earlier sends are reported on the next
					// write of a connected socket: take them off first.
					_, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
				} else if set {
					serr = unix.SetsockoptInt(int(fd), tc.level, opt, v)
				} else {
					got, serr = unix.GetsockoptInt(int(fd), tc.level, opt)
				}
			})
			if serr != nil {
				t.Fatalf("%s: socket option %d: %v", tc.name, opt, serr)
			}
			return got
		}
		sockopt(true, tc.discover, unix.IP_PMTUDISC_DO) // DF: never fragment, learn the path MTU
		// Bad input: 4,000 bytes towards the device, more than any QUIC datagram.
		big := make([]byte, 4000)
		var mtu int
		ipWaitFor(t, tc.name+": the sender's kernel to learn the path MTU", func() bool {
			_, _ = conn.Write(big)
			mtu = sockopt(false, tc.mtuOpt, 0)
			return mtu < 4000
		})
		if mtu < tc.floor || mtu > 1500 {
			t.Fatalf("%s: path MTU learnt %d, want between the family's minimum %d and 1500", tc.name, mtu, tc.floor)
		}
		sockopt(false, unix.SO_ERROR, 0)
		if _, err := conn.Write(big); !errors.Is(err, unix.EMSGSIZE) {
			t.Fatalf("%s: a second 4,000-byte send with DF: %v; want EMSGSIZE (the learnt path MTU is %d)", tc.name, err, mtu)
		}
		if d := r.d.proxy.IPTunnels().Stats().DroppedTooBig - before; d < 1 {
			t.Fatalf("%s: too_big drops %d, want at least 1", tc.name, d)
		}
		// A datagram of the learnt size fits and arrives whole.
		sockopt(false, unix.SO_ERROR, 0)
		mtu = sockopt(false, tc.mtuOpt, 0)
		fit := randomText(mtu - tc.overhead)
		from := netip.MustParseAddrPort(conn.LocalAddr().String())
		if _, err := conn.Write(fit); err != nil {
			t.Fatalf("%s: sending %d bytes (path MTU %d): %v", tc.name, len(fit), mtu, err)
		}
		got, err := tc.read(from)
		if err != nil || string(got) != string(fit) {
			t.Fatalf("%s: the %d-byte datagram of the path MTU arrived as %d bytes, %v", tc.name, len(fit), len(got), err)
		}
		t.Logf("%s: path MTU learnt from tpd's ICMP: %d", tc.name, mtu)
	}
}

// A device that sends more bytes per second than ip-bytes-per-second loses
// the excess, counted as reason "rate"; the tunnel goes on. The bytes that
// crossed upwards are bounded by what the bucket allows: one second's bytes,
// plus the rate for every second since the tunnel was asked for.
func TestIPTunnelByteRateLimit(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t) {
		return
	}
	const bps = 10000
	r := newIPRig(t, func(c *config.Server) { c.IPTunnel.IPBytesPerSecond = bps })
	start := time.Now()
	c := r.dialRaw(t, r.cert)
	echo, got := udpEcho(t, "10.77.0.1:0")
	src := netip.AddrPortFrom(c.v4(), 40010)
	// Bad input: 200 packets of 1,000 bytes (200 kB) against 10 kB per second,
	// far below the packet limit.
	const payload = 1000
	for range 200 {
		c.send(t, udp4(src, echo, randomText(payload)))
	}
	ipWaitFor(t, "rate drops to be counted", func() bool { return r.d.proxy.IPTunnels().Stats().DroppedRate > 0 })
	ipWaitFor(t, "some of the burst to reach the far side", func() bool { return got.Load() > 0 })
	n := got.Load()
	crossed := n * (20 + 8 + payload) // the bucket counts whole IP packets
	allowed := bps + bps*time.Since(start).Seconds()
	if float64(crossed) > allowed {
		t.Fatalf("the far side received %d packets (%d bytes of IP); a bucket of %d bytes per second allows at most %.0f in the %s since the tunnel was asked for",
			n, crossed, bps, allowed, time.Since(start).Round(time.Millisecond))
	}
	if tunnels := r.d.proxy.IPTunnels().Tunnels(); tunnels["alice@laptop"] == "" {
		t.Fatalf("live tunnels %v: the rate limit ended alice's tunnel", tunnels)
	}
}

// A policy change that narrows a live tunnel's grant is advertised at once
// (a new ROUTE_ADVERTISEMENT), packets to and from the removed prefix are
// dropped and counted from then on, the still-granted prefix keeps working
// both ways, and the tunnel stays up.
func TestIPTunnelNarrowerGrant(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t) {
		return
	}
	mustIP(t, "addr", "add", "10.79.0.1/32", "dev", "lo")
	const wide = `package tp.authz

default allow := false

allow if input.action == "ip"

ip := {"routes": ["10.77.0.0/24", "10.79.0.0/24"]} if input.action == "ip"
`
	r := newIPRigPolicy(t, wide)
	c := r.dialRaw(t, r.cert)
	kept, _ := udpEcho(t, "10.77.0.1:0")
	removed, removedGot := udpEcho(t, "10.79.0.1:0")
	src := netip.AddrPortFrom(c.v4(), 40020)
	echoed := func(to netip.AddrPort, msg string) {
		t.Helper()
		c.send(t, udp4(src, to, []byte(msg)))
		got, err := readUDP(t, c, to)
		if err != nil || string(got) != msg {
			t.Fatalf("echo from %s: %q, %v", to, got, err)
		}
	}
	echoed(removed, "to 10.79 while granted")
	echoed(kept, "to 10.77 while granted")
	routes := func() []wire.IPRoute {
		_ = c.str.SetReadDeadline(time.Now().Add(30 * time.Second))
		defer c.str.SetReadDeadline(time.Time{})
		for {
			cp, err := wire.ReadIPCapsule(c.caps)
			if err != nil {
				t.Fatalf("reading the tunnel's capsules: %v", err)
			}
			if cp.Type == wire.IPCapsuleRouteAdvertisement {
				rs, err := wire.ParseRoutes(cp.Payload)
				if err != nil {
					t.Fatal(err)
				}
				return rs
			}
		}
	}
	if rs := routes(); len(rs) != 2 {
		t.Fatalf("first ROUTE_ADVERTISEMENT %v, want the two granted prefixes", rs)
	}

	narrow := []byte(`package tp.authz

default allow := false

allow if input.action == "ip"

ip := {"routes": ["10.77.0.0/24"]} if input.action == "ip"
`)
	if err := os.WriteFile(filepath.Join(r.d.cfg.PolicyDir(), "tp.rego"), narrow, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.d.ReloadPolicy(context.Background()); err != nil {
		t.Fatal(err)
	}
	rs := routes()
	if len(rs) != 1 || rs[0].Start != netip.MustParseAddr("10.77.0.0") || rs[0].End != netip.MustParseAddr("10.77.0.255") {
		t.Fatalf("ROUTE_ADVERTISEMENT after the policy change: %v, want only 10.77.0.0/24", rs)
	}
	before, seen := r.d.proxy.IPTunnels().Stats().DroppedDestination, removedGot.Load()
	// Bad input: a packet to the prefix the policy no longer grants.
	c.send(t, udp4(src, removed, []byte("to 10.79 after the change")))
	ipWaitFor(t, "the drop to the removed prefix to be counted", func() bool {
		return r.d.proxy.IPTunnels().Stats().DroppedDestination > before
	})
	echoed(kept, "to 10.77 after the change")
	if n := removedGot.Load(); n != seen {
		t.Fatalf("the removed prefix's far side received %d datagrams after the change", n-seen)
	}
	// Inbound: a packet from the removed prefix to the device is dropped
	// (bad input), one from the kept prefix sent after it arrives first.
	before = r.d.proxy.IPTunnels().Stats().DroppedInbound
	unsolicited := func(from string, msg string) netip.AddrPort {
		t.Helper()
		pc, err := net.ListenPacket("udp4", from+":0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		if _, err := pc.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(src)); err != nil {
			t.Fatal(err)
		}
		return netip.MustParseAddrPort(pc.LocalAddr().String())
	}
	unsolicited("10.79.0.1", "from 10.79 after the change")
	fromKept := unsolicited("10.77.0.1", "from 10.77 after the change")
	buf := make([]byte, 2000)
	for {
		n, err := c.ReadPacket(buf)
		if err != nil {
			t.Fatalf("waiting for the packet from the kept prefix: %v", err)
		}
		h, err := wire.ParseIPHeader(buf[:n])
		if err != nil || h.Proto != 17 {
			continue
		}
		if h.Src == removed.Addr() {
			t.Fatalf("a packet from the removed prefix %s reached the device after the change", h.Src)
		}
		if h.Src == fromKept.Addr() && binary.BigEndian.Uint16(buf[20:]) == fromKept.Port() {
			break
		}
	}
	if d := r.d.proxy.IPTunnels().Stats().DroppedInbound - before; d < 1 {
		t.Fatal("the packet from the removed prefix was not counted as an inbound drop")
	}
	if tunnels := r.d.proxy.IPTunnels().Tunnels(); tunnels["alice@laptop"] == "" {
		t.Fatalf("live tunnels %v: the narrower grant ended alice's tunnel", tunnels)
	}
}

// CONNECT-UDP holds each flow to connect-udp-packets-per-second: a burst
// beyond it is dropped and counted (RateLimited), and the flow goes on. What
// was relayed upwards is bounded by what the bucket allows: one second's
// datagrams, plus the rate for every second since the flow was asked for.
func TestConnectUDPFlowPacketRate(t *testing.T) {
	t.Parallel()
	const pps = 20
	r := newConnectRig(t, connectPolicy, func(c *config.Server) { c.ConnectUDPMaxPPS = pps })
	echo := testnet.EchoUDP(t)
	start := time.Now()
	c, err := r.connectUDP(t, "h2", echo) // capsules: none lost on the way, every drop is the limit's
	if err != nil {
		t.Fatal(err)
	}
	before := r.d.proxy.ConnectUDPStats()
	// Bad input: 500 datagrams at once against 20 per second.
	for i := range 500 {
		if err := c.WriteDatagram([]byte(fmt.Sprintf("burst %d", i))); err != nil {
			t.Fatal(err)
		}
	}
	// The flow goes on: once the bucket refills, a datagram comes back.
	ipWaitFor(t, "an echo after the burst", func() bool {
		if err := c.WriteDatagram([]byte("after the burst")); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		for {
			got, err := c.ReadDatagram(ctx)
			if err != nil {
				return false
			}
			if string(got) == "after the burst" {
				return true
			}
		}
	})
	c.Close()
	ipWaitFor(t, "the flow to end", func() bool { return r.d.proxy.ConnectUDPStats().Active == 0 })
	st := r.d.proxy.ConnectUDPStats()
	if st.RateLimited == before.RateLimited {
		t.Fatalf("no datagram counted as rate-limited after a burst of 500 against 20 per second (stats %+v)", st)
	}
	up := st.DatagramsUp - before.DatagramsUp
	allowed := pps + pps*time.Since(start).Seconds()
	if float64(up) > allowed {
		t.Fatalf("%d datagrams were relayed upwards; a bucket of %d per second allows at most %.0f in the %s since the flow was asked for",
			up, pps, allowed, time.Since(start).Round(time.Millisecond))
	}
}

// A policy change that takes the IP tunnel away from one identity forgets that
// peer as a revocation does: its live tunnel is reset (never a clean end), its
// tun device removed and the down hook run, and it cannot open a new one; the
// other peer's tunnel goes on untouched.
func TestIPTunnelPolicyChangeForgetsOnePeer(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t) {
		return
	}
	r := newIPRig(t)
	alice, err := r.dialConnectIPGo(t, r.cert)
	if err != nil {
		t.Fatal(err)
	}
	aliceAddr, _ := assignment(t, alice)
	bob, err := r.dialConnectIPGo(t, enrollCert(t, r.connectRig, "bob", "desk"))
	if err != nil {
		t.Fatal(err)
	}
	bobAddr, _ := assignment(t, bob)
	aliceTun := hookEnv(t, r.hookDir, "up", "alice@laptop")["TUN_DEV_NAME"]
	echo, _ := udpEcho(t, "10.77.0.1:0")
	roundTrip := func(c *connectip.Conn, src netip.AddrPort, msg string) error {
		if _, err := c.WritePacket(udp4(src, echo, []byte(msg))); err != nil {
			return err
		}
		got, err := readUDP(t, c, echo)
		if err == nil && string(got) != msg {
			err = fmt.Errorf("echo %q, want %q", got, msg)
		}
		return err
	}
	aliceSrc, bobSrc := netip.AddrPortFrom(aliceAddr, 43000), netip.AddrPortFrom(bobAddr, 44000)
	if err := roundTrip(alice, aliceSrc, "alice before"); err != nil {
		t.Fatalf("alice before the change: %v", err)
	}
	if err := roundTrip(bob, bobSrc, "bob before"); err != nil {
		t.Fatalf("bob before the change: %v", err)
	}

	// The new policy: bob (and dave) keep their tunnels, alice loses hers.
	onlyBob := []byte(strings.Replace(ipPolicy, `{"alice", "bob", "dave"}`, `{"bob", "dave"}`, 1))
	if err := os.WriteFile(filepath.Join(r.d.cfg.PolicyDir(), "tp.rego"), onlyBob, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.d.ReloadPolicy(context.Background()); err != nil {
		t.Fatal(err)
	}
	// alice's tunnel must end with an error (a reset), not go quiet: her
	// datagrams keep going until it does.
	aliceDone := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			if err := roundTrip(alice, aliceSrc, fmt.Sprintf("alice after %d", i)); err != nil {
				aliceDone <- err
				return
			}
		}
	}()
	var aliceErr error
	select {
	case aliceErr = <-aliceDone:
	case <-time.After(30 * time.Second):
		t.Fatal("alice's tunnel still carries packets after the policy took it away")
	}
	if errors.Is(aliceErr, io.EOF) || strings.Contains(aliceErr.Error(), "H3_NO_ERROR") {
		t.Fatalf("alice's tunnel ended cleanly (%v); a policy change must reset it", aliceErr)
	}
	ipWaitFor(t, "alice's tun device to be removed", func() bool { return !linkExists(aliceTun) })
	if env := hookEnv(t, r.hookDir, "down", "alice@laptop"); env["TUN_DEV_NAME"] != aliceTun {
		t.Fatalf("down hook for %q, want %q", env["TUN_DEV_NAME"], aliceTun)
	}
	if _, err := r.dialConnectIPGo(t, r.cert); err == nil {
		t.Fatal("alice opened a new tunnel after the policy took it away")
	}
	for i := range 20 {
		if err := roundTrip(bob, bobSrc, fmt.Sprintf("bob after %d", i)); err != nil {
			t.Fatalf("bob's tunnel after alice's policy change: %v", err)
		}
	}
	if tunnels := r.d.proxy.IPTunnels().Tunnels(); len(tunnels) != 1 || tunnels["bob@desk"] == "" {
		t.Fatalf("live tunnels %v, want only bob's", tunnels)
	}
}
