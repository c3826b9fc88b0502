package tpd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	connectip "github.com/quic-go/connect-ip-go"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/yosida95/uritemplate/v3"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

func mustIP(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// ipPolicy grants alice and bob an IP tunnel to 10.77.0.0/24 (the far side),
// never 10.78.0.0/24; carol gets none.
const ipPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "ip"
	input.identity.user in {"alice", "bob", "dave"}
}

ip := {"routes": ["10.77.0.0/24"]} if input.action == "ip"

reason := "carol gets no IP tunnel in the test policy" if not allow
`

// ipRig is a real tpd with CONNECT-IP on, a hook that writes its environment
// to a file, and a far side: 10.77.0.1 (granted) and 10.78.0.1 (not granted)
// on this namespace's loopback.
type ipRig struct {
	*connectRig
	hookDir string
}

func newIPRig(t *testing.T, mods ...func(*config.Server)) *ipRig {
	t.Helper()
	return newIPRigPolicy(t, ipPolicy, mods...)
}

// newIPRigPolicy is newIPRig with another policy.
func newIPRigPolicy(t *testing.T, policy string, mods ...func(*config.Server)) *ipRig {
	t.Helper()
	mustIP(t, "addr", "add", "10.77.0.1/32", "dev", "lo")
	mustIP(t, "addr", "add", "10.78.0.1/32", "dev", "lo")
	hookDir := t.TempDir()
	r := newConnectRig(t, policy, func(c *config.Server) {
		c.IPTunnel.IPTunnel = true
		c.AdminListen = "127.0.0.1:0" // for /metrics
		for _, m := range mods {
			m(c)
		}
		// The hook refuses dave's tunnels (bad input: a hook that fails).
		// It writes its environment beside the file and renames it, so
		// hookEnv never reads a half-written one.
		c.IPTunnel.IPHook = []string{"/bin/sh", "-c", `[ "$TUN_CLIENT_ID" = dave@tablet ] && { echo "no tunnel for dave"; exit 3; }; env > "$0/.$TP_EVENT-$TUN_CLIENT_ID" && mv "$0/.$TP_EVENT-$TUN_CLIENT_ID" "$0/$TP_EVENT-$TUN_CLIENT_ID"`, hookDir}
	})
	return &ipRig{connectRig: r, hookDir: hookDir}
}

func (r *ipRig) template() *uritemplate.Template {
	return uritemplate.MustNew("https://" + proxyName + ":" + r.port + "/.well-known/masque/ip/*/*/")
}

// dialConnectIPGo opens a tunnel with connect-ip-go, an independent
// CONNECT-IP implementation, as the device whose certificate is cert.
func (r *ipRig) dialConnectIPGo(t *testing.T, cert tls.Certificate) (*connectip.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tr := &connectip.Transport{TLSClientConfig: &tls.Config{ServerName: proxyName, RootCAs: r.roots,
		Certificates: []tls.Certificate{cert}, NextProtos: []string{http3.NextProtoH3}}}
	req, err := connectip.NewRequest(ctx, r.template())
	if err != nil {
		t.Fatal(err)
	}
	// connect-ip-go dials the template's host; the rig listens on 127.0.0.1.
	tr.DialAddr = func(ctx context.Context, _ string, tc *tls.Config, qc *quic.Config) (*quic.Conn, error) {
		return quic.DialAddr(ctx, r.addr, tc, qc)
	}
	conn, _, err := tr.Dial(req)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn, nil
}

// assignment waits for the tunnel's IPv4 address and routes.
func assignment(t *testing.T, c *connectip.Conn) (netip.Addr, []connectip.IPRoute) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addrs, err := c.ReceiveAddressAssignment(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var v4 netip.Addr
	for _, a := range addrs {
		if a.IPPrefix.Addr().Is4() {
			v4 = a.IPPrefix.Addr()
		}
	}
	routes, err := c.Routes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return v4, routes
}

// ipv4 builds an IPv4 packet.
func ipv4(src, dst netip.Addr, proto byte, payload []byte) []byte {
	p := make([]byte, 20+len(payload))
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	p[8], p[9] = 64, proto
	copy(p[12:16], src.AsSlice())
	copy(p[16:20], dst.AsSlice())
	binary.BigEndian.PutUint16(p[10:], inetChecksum(p[:20]))
	copy(p[20:], payload)
	return p
}

func inetChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

func udp4(src, dst netip.AddrPort, data []byte) []byte {
	u := make([]byte, 8+len(data))
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(len(u)))
	copy(u[8:], data) // checksum 0: none (IPv4)
	return ipv4(src.Addr(), dst.Addr(), 17, u)
}

func echoRequest(src, dst netip.Addr, id, seq uint16) []byte {
	m := make([]byte, 8+16)
	m[0] = 8
	binary.BigEndian.PutUint16(m[4:], id)
	binary.BigEndian.PutUint16(m[6:], seq)
	copy(m[8:], "tp ip echo test.")
	binary.BigEndian.PutUint16(m[2:], inetChecksum(m))
	return ipv4(src, dst, 1, m)
}

// udpEcho serves UDP echo on addr and counts what it received.
func udpEcho(t *testing.T, addr string) (netip.AddrPort, *atomic.Int64) {
	t.Helper()
	pc, err := net.ListenPacket("udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	var n atomic.Int64
	go func() {
		buf := make([]byte, 65536)
		for {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			n.Add(1)
			_, _ = pc.WriteTo(buf[:k], from)
		}
	}()
	return netip.MustParseAddrPort(pc.LocalAddr().String()), &n
}

// readUDP reads packets from c until a UDP packet from from arrives, and
// returns its payload.
func readUDP(t *testing.T, c interface{ ReadPacket([]byte) (int, error) }, from netip.AddrPort) ([]byte, error) {
	t.Helper()
	buf := make([]byte, 65536)
	for {
		n, err := c.ReadPacket(buf)
		if err != nil {
			return nil, err
		}
		p := buf[:n]
		h, err := wire.ParseIPHeader(p)
		if err != nil || h.Proto != 17 || h.Src != from.Addr() {
			continue
		}
		ihl := int(p[0]&0x0f) * 4
		if binary.BigEndian.Uint16(p[ihl:]) != from.Port() {
			continue
		}
		return append([]byte(nil), p[ihl+8:]...), nil
	}
}

func hookEnv(t *testing.T, dir, event, device string) map[string]string {
	t.Helper()
	var b []byte
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		if b, err = os.ReadFile(filepath.Join(dir, event+"-"+device)); err == nil || time.Now().After(deadline) {
			if err != nil {
				t.Fatalf("the hook did not run for %s %s: %v", event, device, err)
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	env := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			env[k] = v
		}
	}
	return env
}

func ipWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// connect-ip-go, an independent CONNECT-IP client, gets an address from tpd's
// pool and the policy's route, reaches the far side with ICMP echo and UDP
// through the tunnel's tun device, and the hook ran with TUN_DEV_NAME,
// TUN_CLIENT_ID, the identity fields and, on up already, the granted routes
// (TP_ROUTES); a device the policy refuses gets 403.
func TestIPTunnelConnectIPGo(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t) {
		return
	}
	r := newIPRig(t)
	c, err := r.dialConnectIPGo(t, r.cert)
	if err != nil {
		t.Fatal(err)
	}
	addr, routes := assignment(t, c)
	if !netip.MustParsePrefix("100.96.0.0/16").Contains(addr) {
		t.Fatalf("assigned %s, want an address of the default pool 100.96.0.0/16", addr)
	}
	want := connectip.IPRoute{StartIP: netip.MustParseAddr("10.77.0.0"), EndIP: netip.MustParseAddr("10.77.0.255")}
	if len(routes) != 1 || routes[0] != want {
		t.Fatalf("routes %v, want only %v (the policy's grant)", routes, want)
	}

	env := hookEnv(t, r.hookDir, "up", "alice@laptop")
	if !strings.HasPrefix(env["TUN_DEV_NAME"], "tpip") || env["TUN_CLIENT_ID"] != "alice@laptop" || env["TP_USER"] != "alice" ||
		env["TP_DEVICE"] != "laptop" || !strings.Contains(env["TP_ADDRESSES"], addr.String()) {
		t.Fatalf("hook environment: TUN_DEV_NAME=%q TUN_CLIENT_ID=%q TP_USER=%q TP_DEVICE=%q TP_ADDRESSES=%q",
			env["TUN_DEV_NAME"], env["TUN_CLIENT_ID"], env["TP_USER"], env["TP_DEVICE"], env["TP_ADDRESSES"])
	}
	if env["TP_ROUTES"] != "10.77.0.0-10.77.0.255/0" {
		t.Fatalf("hook environment on up: TP_ROUTES=%q, want the policy's grant 10.77.0.0-10.77.0.255/0", env["TP_ROUTES"])
	}
	if !linkExists(env["TUN_DEV_NAME"]) {
		t.Fatalf("the tunnel's tun device %s does not exist", env["TUN_DEV_NAME"])
	}

	// ICMP echo to the far side.
	far := netip.MustParseAddr("10.77.0.1")
	if icmp, err := c.WritePacket(echoRequest(addr, far, 7, 1)); err != nil || icmp != nil {
		t.Fatalf("WritePacket: %v (ICMP %x)", err, icmp)
	}
	buf := make([]byte, 2000)
	for {
		n, err := c.ReadPacket(buf)
		if err != nil {
			t.Fatal(err)
		}
		h, _ := wire.ParseIPHeader(buf[:n])
		if h.Proto == 1 && h.Src == far && buf[20] == 0 && binary.BigEndian.Uint16(buf[24:]) == 7 {
			break // echo reply, id 7
		}
	}

	// UDP both ways, with content checked.
	echo, _ := udpEcho(t, "10.77.0.1:0")
	src := netip.AddrPortFrom(addr, 40000)
	for i := range 50 {
		msg := []byte(fmt.Sprintf("datagram %d through connect-ip-go", i))
		if _, err := c.WritePacket(udp4(src, echo, msg)); err != nil {
			t.Fatal(err)
		}
		got, err := readUDP(t, c, echo)
		if err != nil || string(got) != string(msg) {
			t.Fatalf("echo %d: %q, %v", i, got, err)
		}
	}

	// A tunnel the hook refuses is not opened: the client gets 500, its tun
	// device is gone, alice's tunnel is untouched.
	dave := enrollCert(t, r.connectRig, "dave", "tablet")
	if _, err := r.dialConnectIPGo(t, dave); err == nil || !strings.Contains(err.Error(), "500") {
		t.Fatalf("dave's CONNECT-IP with a failing hook: %v, want 500", err)
	}
	if tunnels := r.d.proxy.IPTunnels().Tunnels(); len(tunnels) != 1 || tunnels["alice@laptop"] == "" {
		t.Fatalf("live tunnels %v, want only alice's", tunnels)
	}
	ipWaitFor(t, "the refused tunnel's tun device tpip1 to be removed", func() bool { return !linkExists("tpip1") })

	// A device the policy gives no tunnel is refused with the policy's reason.
	carol := enrollCert(t, r.connectRig, "carol", "phone")
	if _, err := r.dialConnectIPGo(t, carol); err == nil || !strings.Contains(err.Error(), "403") {
		t.Fatalf("carol's CONNECT-IP: %v, want 403", err)
	}
}

// linkExists reports whether the namespace has a network interface name
// (/sys/class/net shows the namespace that mounted /sys, not this one).
func linkExists(name string) bool {
	return name != "" && exec.Command("ip", "link", "show", "dev", name).Run() == nil
}

func enrollCert(t *testing.T, r *connectRig, user, device string) tls.Certificate {
	t.Helper()
	c, _, _ := enrollClient(t, r.d, r.d.cfg.PublicURL(), user, device)
	cert, err := c.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return *cert
}

// rawIP is a CONNECT-IP tunnel spoken with the wire package directly, so that
// the test can send what a well-behaved client never would.
type rawIP struct {
	str   *http3.RequestStream
	caps  *bufio.Reader // the capsules after the first ADDRESS_ASSIGN
	addrs []wire.AssignedAddress
}

func (r *ipRig) dialRaw(t *testing.T, cert tls.Certificate) *rawIP {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, r.addr, &tls.Config{ServerName: proxyName, RootCAs: r.roots,
		Certificates: []tls.Certificate{cert}, NextProtos: []string{http3.NextProtoH3}},
		// 1350-byte packets, as tp ip opens its connection: the datagrams fit a 1280-byte tun MTU.
		&quic.Config{EnableDatagrams: true, InitialPacketSize: 1350})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = qc.CloseWithError(0, "") })
	cc := (&http3.Transport{EnableDatagrams: true}).NewClientConn(qc)
	str, err := cc.OpenRequestStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("https://" + proxyName + "/.well-known/masque/ip/*/*/")
	if err := str.SendRequestHeader(&http.Request{Method: http.MethodConnect, Proto: "connect-ip", URL: u, Host: proxyName,
		Header: http.Header{"Capsule-Protocol": {"?1"}}}); err != nil {
		t.Fatal(err)
	}
	resp, err := str.ReadResponse()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT-IP: %v, %v", resp, err)
	}
	caps := bufio.NewReader(str)
	c, err := wire.ReadIPCapsule(caps)
	if err != nil || c.Type != wire.IPCapsuleAddressAssign {
		t.Fatalf("first capsule: %+v, %v; want ADDRESS_ASSIGN", c, err)
	}
	addrs, err := wire.ParseAddresses(c.Payload)
	if err != nil {
		t.Fatal(err)
	}
	return &rawIP{str: str, caps: caps, addrs: addrs}
}

func (c *rawIP) v4() netip.Addr {
	for _, a := range c.addrs {
		if a.Prefix.Addr().Is4() {
			return a.Prefix.Addr()
		}
	}
	return netip.Addr{}
}

func (c *rawIP) send(t *testing.T, pkt []byte) {
	t.Helper()
	if err := c.str.SendDatagram(wire.AppendIPDatagram(nil, pkt)); err != nil {
		t.Fatal(err)
	}
}

func (c *rawIP) ReadPacket(b []byte) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := c.str.ReceiveDatagram(ctx)
	if err != nil {
		return 0, err
	}
	pkt, ok := wire.ParseIPDatagram(p)
	if !ok {
		return 0, fmt.Errorf("datagram with another context ID")
	}
	return copy(b, pkt), nil
}

// TP holds every packet to the policy: a packet to a prefix the policy does not
// grant and a packet with a source the device was not assigned are dropped
// and counted (tp_ip_packets_dropped_total), and never reach the far side,
// while the granted destination keeps working.
func TestIPTunnelEnforcesPolicyPerPacket(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t) {
		return
	}
	r := newIPRig(t)
	c := r.dialRaw(t, r.cert)
	addr := c.v4()
	allowed, _ := udpEcho(t, "10.77.0.1:0")
	denied, deniedGot := udpEcho(t, "10.78.0.1:0")
	st := r.d.proxy.IPTunnels().Stats
	before := st()

	// Bad input 1: a destination outside the grant (10.78.0.0/24).
	c.send(t, udp4(netip.AddrPortFrom(addr, 40001), denied, []byte("to a denied prefix")))
	// Bad input 2: a spoofed source, another address than the one assigned.
	c.send(t, udp4(netip.AddrPortFrom(netip.MustParseAddr("100.96.200.200"), 40002), allowed, []byte("spoofed")))
	// Bad input 3: not an IP packet.
	c.send(t, []byte{0x45, 1, 2})
	ipWaitFor(t, "the drops to be counted", func() bool {
		s := st()
		return s.DroppedDestination > before.DroppedDestination && s.DroppedSource > before.DroppedSource &&
			s.DroppedMalformed > before.DroppedMalformed
	})
	// The granted destination still works, and the packets sent before it to
	// the denied one never arrived.
	msg := []byte("to the granted prefix")
	c.send(t, udp4(netip.AddrPortFrom(addr, 40003), allowed, msg))
	got, err := readUDP(t, c, allowed)
	if err != nil || string(got) != string(msg) {
		t.Fatalf("echo through the tunnel: %q, %v", got, err)
	}
	if n := deniedGot.Load(); n != 0 {
		t.Fatalf("the far side of the denied prefix received %d datagrams", n)
	}
	m := scrapeMetrics(t, r.d.AdminAddr())
	for _, key := range []string{`tp_ip_packets_dropped_total{reason="destination"}`, `tp_ip_packets_dropped_total{reason="source"}`} {
		if v := m.get(t, key); v != 1 {
			t.Fatalf("%s = %g, want 1", key, v)
		}
	}
}

// Revoking a device mid-transfer ends its tunnel and removes its tun device,
// it cannot reconnect, and another device's transfer goes on with every
// datagram intact.
func TestIPTunnelRevokeForgetsOnePeer(t *testing.T) {
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
	bobCert := enrollCert(t, r.connectRig, "bob", "desk")
	bob, err := r.dialConnectIPGo(t, bobCert)
	if err != nil {
		t.Fatal(err)
	}
	bobAddr, _ := assignment(t, bob)
	aliceTun := hookEnv(t, r.hookDir, "up", "alice@laptop")["TUN_DEV_NAME"]
	echo, _ := udpEcho(t, "10.77.0.1:0")

	// alice streams datagrams until her tunnel ends.
	aliceDone := make(chan error, 1)
	go func() {
		src := netip.AddrPortFrom(aliceAddr, 41000)
		for i := 0; ; i++ {
			if _, err := alice.WritePacket(udp4(src, echo, []byte(fmt.Sprintf("alice %d", i)))); err != nil {
				aliceDone <- err
				return
			}
			if _, err := readUDP(t, alice, echo); err != nil {
				aliceDone <- err
				return
			}
		}
	}()
	src := netip.AddrPortFrom(bobAddr, 42000)
	bobEcho := func(i int) {
		msg := []byte(fmt.Sprintf("bob's datagram %d", i))
		if _, err := bob.WritePacket(udp4(src, echo, msg)); err != nil {
			t.Fatalf("bob %d: %v", i, err)
		}
		got, err := readUDP(t, bob, echo)
		if err != nil || string(got) != string(msg) {
			t.Fatalf("bob's echo %d: %q, %v", i, got, err)
		}
	}
	for i := range 100 {
		bobEcho(i)
	}
	revoked := time.Now()
	res, err := r.d.Revoke(context.Background(), "device", "alice@laptop", false)
	if err != nil || res.Closed < 1 {
		t.Fatalf("revoke alice@laptop: %+v, %v", res, err)
	}
	for i := 100; i < 200; i++ {
		bobEcho(i)
	}
	select {
	case err := <-aliceDone:
		t.Logf("alice's tunnel ended %s after the revocation began: %v", time.Since(revoked), err)
		// connect-ip-go reports the reset (H3_CONNECT_ERROR) or, when its
		// other goroutine saw it first, that its connection is closed; never
		// a clean end.
		if errors.Is(err, io.EOF) || strings.Contains(err.Error(), "H3_NO_ERROR") {
			t.Fatalf("alice's tunnel ended cleanly (%v); a revocation must reset it", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("alice's tunnel still carries packets after her revocation")
	}
	ipWaitFor(t, "alice's tun device to be removed", func() bool {
		return !linkExists(aliceTun)
	})
	if env := hookEnv(t, r.hookDir, "down", "alice@laptop"); env["TUN_DEV_NAME"] != aliceTun {
		t.Fatalf("down hook for %q, want %q", env["TUN_DEV_NAME"], aliceTun)
	}
	if _, err := r.dialConnectIPGo(t, r.cert); err == nil {
		t.Fatal("the revoked device opened a new tunnel")
	}
	// The listing forgets alice's tunnel last, once its down hook has run
	// (IPTunnels.Close), so it is waited for, not read at once.
	onlyBob := func() bool {
		tunnels := r.d.proxy.IPTunnels().Tunnels()
		return len(tunnels) == 1 && tunnels["bob@desk"] != ""
	}
	ipWaitFor(t, "the live tunnels to be bob's only", onlyBob)
}

// A device that sends faster than ip-packets-per-second loses the excess,
// counted as reason "rate"; the tunnel goes on. What crossed upwards (what
// the far side received) is bounded by what the bucket allows: one second's
// packets, plus the rate for every second since the tunnel was asked for (its
// bucket fills from its first packet, which is later). A slower machine only
// raises that bound.
func TestIPTunnelRateLimit(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t) {
		return
	}
	const pps = 20
	r := newIPRig(t, func(c *config.Server) { c.IPTunnel.IPPacketsPerSecond = pps })
	start := time.Now()
	c := r.dialRaw(t, r.cert)
	echo, got := udpEcho(t, "10.77.0.1:0")
	src := netip.AddrPortFrom(c.v4(), 40010)
	// Bad input: a burst of 2,000 packets against a bucket of 20 per second.
	for i := range 2000 {
		c.send(t, udp4(src, echo, []byte(fmt.Sprintf("burst %d", i))))
	}
	ipWaitFor(t, "rate drops to be counted", func() bool { return r.d.proxy.IPTunnels().Stats().DroppedRate > 0 })
	ipWaitFor(t, "some of the burst to reach the far side", func() bool { return got.Load() > 0 })
	n := got.Load()
	allowed := pps + pps*time.Since(start).Seconds()
	if float64(n) > allowed {
		t.Fatalf("the far side received %d packets of the burst; a bucket of %d packets per second allows at most %.0f in the %s since the tunnel was asked for",
			n, pps, allowed, time.Since(start).Round(time.Millisecond))
	}
}
