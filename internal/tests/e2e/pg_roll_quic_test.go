package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
	"github.com/tp-proxy/tp/proxy"
)

// udpDoor is a UDP load balancer in front of tpd instances, as docs/SCALE.md
// ("What the load balancer must do") asks of one: a packet whose
// destination connection ID carries an instance's QUIC-LB server ID (every
// packet after the client heard from a server) goes to that instance, whether
// it is ready or not; any other packet (a client's first Initials, whose
// connection ID the client chose) goes to the instance this client address
// went to before while that one is ready, else to the next ready instance in
// turn (its /readyz answers 200). Each client address and instance pair gets
// its own socket towards the instance, so the instance's answers come back to
// that client.
type udpDoor struct {
	pc       *net.UDPConn
	backends []*udpBackend
	cidLen   int // 1 (first octet) + 1 (server ID) + 8 (nonce)

	wg       sync.WaitGroup // the flows' readers
	mu       sync.Mutex
	flows    map[string]*udpFlow // client address + "|" + backend index
	affinity map[string]int      // client address → backend, for packets no connection ID routes
	next     int

	// Packets from clients: routed by a connection ID's server ID, routed
	// by client address, short-header packets whose connection ID carries
	// no known server ID (there must be none), dropped with no ready backend.
	byCID, byAddr, shortUnroutable, noBackend atomic.Int64
}

type udpBackend struct {
	addr     *net.UDPAddr
	serverID byte
	readyz   string
	ready    atomic.Bool
}

type udpFlow struct {
	up   *net.UDPConn
	last atomic.Int64 // unix nanoseconds of the last packet either way
}

// udpDoorIdle is how long a client's flow to one instance lives without a packet.
const udpDoorIdle = 30 * time.Second

// newUDPDoor listens on addr (a UDP address on loopback).
func newUDPDoor(t *testing.T, addr string, cidLen int, backends []*udpBackend) *udpDoor {
	t.Helper()
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenUDP("udp", ua)
	if err != nil {
		t.Fatalf("the UDP balancer cannot listen on the TCP balancer's port: %v", err)
	}
	d := &udpDoor{pc: pc, backends: backends, cidLen: cidLen, flows: map[string]*udpFlow{}, affinity: map[string]int{}}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		pc.Close()
		wg.Wait() // serve has returned: no new flow
		d.mu.Lock()
		for _, f := range d.flows {
			f.up.Close()
		}
		d.mu.Unlock()
		d.wg.Wait()
	})
	for _, b := range backends {
		wg.Go(func() { b.check(ctx) })
	}
	wg.Go(func() { d.serve() })
	return d
}

// check keeps b.ready current: /readyz every 250 ms, as a balancer's health
// check (Kubernetes readiness) does.
func (b *udpBackend) check(ctx context.Context) {
	c := &http.Client{Timeout: 2 * time.Second}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		ok := false
		if resp, err := c.Get(b.readyz); err == nil {
			ok = resp.StatusCode == http.StatusOK
			resp.Body.Close()
		}
		b.ready.Store(ok)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// dcid is a QUIC packet's destination connection ID and whether the packet
// has a long header; ok is false for a packet too short to hold one.
func (d *udpDoor) dcid(p []byte) (cid []byte, long, ok bool) {
	if len(p) == 0 {
		return nil, false, false
	}
	if p[0]&0x80 != 0 { // long header: flags, version (4), DCID length, DCID
		if len(p) < 6 || len(p) < 6+int(p[5]) {
			return nil, true, false
		}
		return p[6 : 6+int(p[5])], true, true
	}
	if len(p) < 1+d.cidLen { // short header: flags, DCID of the server's length
		return nil, false, false
	}
	return p[1 : 1+d.cidLen], false, true
}

// route picks the backend of a packet from client.
func (d *udpDoor) route(client string, p []byte) int {
	cid, long, ok := d.dcid(p)
	if ok && len(cid) == d.cidLen {
		if _, sid, ok := proxy.DecodeQUICLB(cid, 1); ok {
			for i, b := range d.backends {
				if b.serverID == sid[0] {
					d.byCID.Add(1)
					return i
				}
			}
		}
	}
	if ok && !long {
		d.shortUnroutable.Add(1)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if i, ok := d.affinity[client]; ok && d.backends[i].ready.Load() {
		d.byAddr.Add(1)
		return i
	}
	for range d.backends {
		i := d.next % len(d.backends)
		d.next++
		if d.backends[i].ready.Load() {
			d.affinity[client] = i
			d.byAddr.Add(1)
			return i
		}
	}
	d.noBackend.Add(1)
	return -1
}

func (d *udpDoor) serve() {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := d.pc.ReadFromUDP(buf)
		if err != nil {
			return
		}
		i := d.route(from.String(), buf[:n])
		if i < 0 {
			continue // dropped: the client retransmits
		}
		f := d.flow(from, i)
		if f == nil {
			continue
		}
		f.last.Store(time.Now().UnixNano())
		f.up.Write(buf[:n]) // a lost datagram is QUIC's to recover
	}
}

// flow is the socket that carries client's packets to backend i, opened on
// first use; its reader passes the backend's answers back to client and ends
// after udpDoorIdle without a packet.
func (d *udpDoor) flow(client *net.UDPAddr, i int) *udpFlow {
	key := fmt.Sprintf("%s|%d", client, i)
	d.mu.Lock()
	defer d.mu.Unlock()
	if f, ok := d.flows[key]; ok {
		return f
	}
	up, err := net.DialUDP("udp", nil, d.backends[i].addr)
	if err != nil {
		return nil
	}
	f := &udpFlow{up: up}
	f.last.Store(time.Now().UnixNano())
	d.flows[key] = f
	d.wg.Go(func() {
		defer func() {
			d.mu.Lock()
			delete(d.flows, key)
			if d.affinity[client.String()] == i {
				delete(d.affinity, client.String())
			}
			d.mu.Unlock()
			up.Close()
		}()
		buf := make([]byte, 64<<10)
		for {
			up.SetReadDeadline(time.Now().Add(udpDoorIdle))
			n, err := up.Read(buf)
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				if time.Since(time.Unix(0, f.last.Load())) < udpDoorIdle {
					continue
				}
				return
			}
			if err != nil {
				// ECONNREFUSED: the instance is down (it restarts on the same
				// port); keep the flow, as a balancer keeps its mapping.
				if errors.Is(err, syscall.ECONNREFUSED) {
					continue
				}
				return
			}
			f.last.Store(time.Now().UnixNano())
			d.pc.WriteToUDP(buf[:n], client) // a lost datagram is QUIC's to recover
		}
	})
	return f
}

// Rolling restart of all three over QUIC: TestPGRollingRestart's 10
// concurrent checksummed transfers and drains, with every client on QUIC over
// UDP behind udpDoor, a UDP balancer that routes by the instance's QUIC-LB
// server ID in the connection IDs (each instance has its own, quic-server-id
// 01, 02, 03) and sends new flows only to instances whose /readyz answers 200.
// Two agents (alice's laptop serving chat, her desk serving files, both over
// QUIC) hold their names through the three drains: each moves to another
// instance when its own drains. Every transfer must complete with both
// checksums matching or end with tp exiting non-zero; a clean end with wrong or
// missing bytes fails the test. Every short-header packet the balancer saw
// carried a server ID it knows (the connection IDs route), and most packets
// were routed by it.
func TestPGRollingRestartQUIC(t *testing.T) {
	parallelLong(t)
	raceTPD(t)
	_, dsn := testpg.NewDatabase(t)
	base := []string{"TP_DATABASE=" + dsn, "TP_DATABASE_PASSWORD=" + testpg.Password, "TP_SHUTDOWN_TIMEOUT=2s"}
	dirs := peerDataDirs(t, 3, peerPolicy)
	envs := make([][]string, len(dirs))
	var backends []*udpBackend
	var srvs []*server
	for i, dir := range dirs {
		// Fixed ports, below the kernel's ephemeral range: a restart takes
		// the ports its tpd let go, which a ":0" port would leave to any
		// socket of the machine's in the meantime.
		envs[i] = slices.Concat(base, []string{fmt.Sprintf("TP_QUIC_SERVER_ID=%02x", i+1), "TP_ADMIN_LISTEN=" + testnet.FreeAddr(t, "tcp").String()})
		s := startTPD(t, dir, fmt.Sprintf("127.0.0.1:%d", testnet.FreePort(t, "tcp+udp")), envs[i])
		s.mustStop = true
		srvs = append(srvs, s)
		admin := adminListen(t, s)
		waitLog(t, s.log, "QUIC-LB", 10*time.Second)
		ua, err := net.ResolveUDPAddr("udp", s.Addr)
		if err != nil {
			t.Fatal(err)
		}
		backends = append(backends, &udpBackend{addr: ua, serverID: byte(i + 1), readyz: "http://" + admin + "/readyz"})
	}
	// One address for both balancers, as one load balancer IP with TCP and
	// UDP 443: the agents get their certificates over HTTPS (TCP, spread
	// over the instances); every tp/1 session goes over QUIC (UDP).
	tcpDoor := newFrontDoor(t, srvs[0].Addr, srvs[1].Addr, srvs[2].Addr)
	tcpDoor.mode(true, false)
	door := newUDPDoor(t, tcpDoor.ln.Addr().String(), 1+1+8, backends)
	doorURL := "https://" + tcpDoor.ln.Addr().String()
	quic := "TP_TRANSPORT=quic"

	laptop := srvs[0].login(t, "alice", "laptop")
	desk := srvs[2].login(t, "alice", "desk")
	bob := srvs[1].login(t, "bob", "phone")
	bobHome := strings.TrimPrefix(bob[0], "TP_HOME=")
	for _, env := range [][]string{laptop, desk, bob} {
		setServer(t, strings.TrimPrefix(env[0], "TP_HOME="), doorURL)
	}
	bob = append(bob, quic)
	paced := pacedChecksumServer(t)
	agents := []*testlog.Buffer{
		startExpose(t, append(laptop, quic), "chat", paced, "--allow-user", "bob"),
		startExpose(t, append(desk, quic), "files", paced, "--allow-user", "bob"),
	}

	rig := rollRig{
		srvs:    srvs,
		names:   []string{"chat.rev.tp.internal", "files.rev.tp.internal"},
		agents:  agents,
		dial:    func(int) []string { return bob },
		direct:  func(s *server) []string { return []string{"TP_HOME=" + homeOn(t, bobHome, s), quic} },
		restart: func(i int, s *server) *server { return startTPD(t, s.DataDir, s.Addr, envs[i]) },
	}
	rig.run(t)

	t.Logf("UDP balancer: %d packets routed by the server ID in their connection ID, %d by client address (first packets), %d dropped with no instance ready",
		door.byCID.Load(), door.byAddr.Load(), door.noBackend.Load())
	if n := door.shortUnroutable.Load(); n > 0 {
		t.Fatalf("%d short-header packets carried a connection ID with no known server ID: the balancer could not route them after an address change", n)
	}
	if door.byCID.Load() <= door.byAddr.Load() {
		t.Fatalf("only %d packets were routed by connection ID, %d by address: the instances' connection IDs do not carry their server IDs", door.byCID.Load(), door.byAddr.Load())
	}
	for i, a := range agents {
		if !strings.Contains(a.String(), "reconnecting") {
			t.Fatalf("agent %d never moved: each instance was drained, so each agent's was\n%s", i, a.String())
		}
	}
}

// peerDataDirs makes n data dirs sharing one CA (the first one's) and one
// policy, as startPeers does, without starting tpd: each instance can then be
// started with its own environment.
func peerDataDirs(t *testing.T, n int, policy string) []string {
	t.Helper()
	first := initTPD(t, policy)
	dirs := []string{first}
	for range n - 1 {
		dir := filepath.Join(t.TempDir(), "tpdata")
		if err := os.MkdirAll(filepath.Join(dir, "ca"), 0o700); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"root.crt", "root.key", "intermediate.crt", "intermediate.key", "attestation-root.crt", "attestation-root.key"} {
			b, err := os.ReadFile(filepath.Join(first, "ca", f))
			if err == nil {
				err = os.WriteFile(filepath.Join(dir, "ca", f), b, 0o600)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		run(t, nil, binary("tpd"), "init", "--data-dir", dir)
		if err := os.WriteFile(filepath.Join(dir, "policy", "tp.rego"), []byte(policy), 0o600); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, dir)
	}
	return dirs
}
