package proxy_test

import (
	"bytes"
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy"
)

// lbModel is an L4 UDP load balancer on loopback as QUIC-LB describes one: a
// packet whose destination connection ID has the configured length and a known
// server ID goes to that server; any other (a client's first Initial, whose ID
// the client chose) goes where its 5-tuple went before, and a new 5-tuple to the
// next backend in turn, as a 5-tuple hash spreads them. Each client tuple gets
// its own upstream socket per backend, so a backend sees a new client address
// when the client's changes, and replies go back to the tuple they belong to.
type lbModel struct {
	t        testing.TB
	vip      *net.UDPConn
	backends []*net.UDPAddr
	ids      [][]byte // server ID of each backend
	cidLen   int
	configID uint8

	mu       sync.Mutex
	tuples   map[string]int          // 5-tuple fallback: client address → backend
	next     int                     // backend for the next new tuple
	up       map[string]*net.UDPConn // client address + backend → upstream socket
	perBack  []int                   // packets sent to each backend
	byCID    int                     // packets routed by connection ID
	cids     map[string]bool         // routable connection IDs seen
	badCIDs  int                     // packets whose connection ID had the right length but did not decode
	badShown []string                // the first few of them
	clients  map[string]bool         // client addresses seen
	lastFrom string
	lastByID int // packets from lastFrom routed by connection ID
}

func startLB(t testing.TB, cidLen int, configID uint8, backends []string, ids [][]byte) *lbModel {
	t.Helper()
	vip, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	lb := &lbModel{t: t, vip: vip, ids: ids, cidLen: cidLen, configID: configID,
		tuples: map[string]int{}, up: map[string]*net.UDPConn{}, perBack: make([]int, len(backends)),
		cids: map[string]bool{}, clients: map[string]bool{}}
	for _, b := range backends {
		a, err := net.ResolveUDPAddr("udp", b)
		if err != nil {
			t.Fatal(err)
		}
		lb.backends = append(lb.backends, a)
	}
	t.Cleanup(func() {
		_ = vip.Close()
		lb.mu.Lock()
		defer lb.mu.Unlock()
		for _, c := range lb.up {
			_ = c.Close()
		}
	})
	go lb.serve()
	return lb
}

func (lb *lbModel) addr() string { return lb.vip.LocalAddr().String() }

// dcid is the destination connection ID of the datagram's first packet.
func (lb *lbModel) dcid(b []byte) []byte {
	if len(b) < 1 {
		return nil
	}
	if b[0]&0x80 != 0 { // long header: version, then the ID's length
		if len(b) < 6 || len(b) < 6+int(b[5]) {
			return nil
		}
		return b[6 : 6+int(b[5])]
	}
	if len(b) < 1+lb.cidLen {
		return nil
	}
	return b[1 : 1+lb.cidLen]
}

// clientChosenCID reports whether pkt is a QUIC v1 Initial or 0-RTT packet,
// whose destination connection ID the client chose rather than the server.
func clientChosenCID(pkt []byte) bool {
	if len(pkt) < 1 || pkt[0]&0x80 == 0 {
		return false
	}
	typ := pkt[0] & 0x30 >> 4
	return typ == 0 || typ == 1
}

func (lb *lbModel) route(src string, pkt []byte) int {
	lb.mu.Lock()
	defer lb.mu.Unlock()
	lb.clients[src] = true
	if lb.lastFrom != src {
		lb.lastFrom, lb.lastByID = src, 0
	}
	if cid := lb.dcid(pkt); len(cid) == lb.cidLen {
		cfg, sid, ok := proxy.DecodeQUICLB(cid, len(lb.ids[0]))
		if ok && cfg == lb.configID {
			for i, id := range lb.ids {
				if bytes.Equal(sid, id) {
					lb.byCID++
					lb.lastByID++
					lb.cids[string(cid)] = true
					lb.perBack[i]++
					return i
				}
			}
		}
		// An Initial or 0-RTT packet may carry the ID the client chose, at random
		// and sometimes of this very length: routed by 5-tuple, never counted.
		if !clientChosenCID(pkt) {
			lb.badCIDs++
			if len(lb.badShown) < 5 {
				lb.badShown = append(lb.badShown, net.HardwareAddr(cid).String())
			}
		}
	}
	i, ok := lb.tuples[src]
	if !ok {
		i = lb.next % len(lb.backends)
		lb.next++
		lb.tuples[src] = i
	}
	lb.perBack[i]++
	return i
}

func (lb *lbModel) serve() {
	buf := make([]byte, 1<<16)
	for {
		n, src, err := lb.vip.ReadFromUDP(buf)
		if err != nil {
			return
		}
		i := lb.route(src.String(), buf[:n])
		up, err := lb.upstream(src, i)
		if err != nil {
			lb.t.Errorf("load balancer: %v", err)
			return
		}
		_, _ = up.Write(buf[:n])
	}
}

func (lb *lbModel) upstream(client *net.UDPAddr, i int) (*net.UDPConn, error) {
	key := client.String() + "|" + lb.backends[i].String()
	lb.mu.Lock()
	defer lb.mu.Unlock()
	if c, ok := lb.up[key]; ok {
		return c, nil
	}
	c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, lb.backends[i])
	if err != nil {
		return nil, err
	}
	lb.up[key] = c
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			_, _ = lb.vip.WriteToUDP(buf[:n], client)
		}
	}()
	return c, nil
}

// TestQUICLBKeepsMigratedClient: two servers with QUIC-LB server IDs 0a and 0b
// behind a load balancer that routes by connection ID. A client of server A
// moves mid-transfer, by a NAT rebinding (it does not know) and by migrating
// to a new socket itself (then it uses a new connection ID A issued). A 5-tuple
// balancer would send the new tuple to B, the next in turn, which does not know
// the connection; routed by connection ID every packet reaches A and the
// transfer's checksum matches. Every connection ID the client used after the
// handshake has A's server ID, the configured length and config rotation.
func TestQUICLBKeepsMigratedClient(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"nat-rebinding", "client-migration"} {
		t.Run(how, func(t *testing.T) {
			size := int64(8 << 20)
			if testing.Short() {
				size = 2 << 20
			}
			lbA := &proxy.QUICLB{ConfigID: 2, ServerID: []byte{0x0a}}
			lbB := &proxy.QUICLB{ConfigID: 2, ServerID: []byte{0x0b}}
			a := newQUICEnv(t, nil, proxy.QUICOptions{LB: lbA})
			b := newQUICEnv(t, nil, proxy.QUICOptions{LB: lbB})
			lb := startLB(t, lbA.Len(), 2, []string{a.udpAddr, b.udpAddr}, [][]byte{lbA.ServerID, lbB.ServerID})
			d := a.quicDialer(t)
			var change func()
			switch how {
			case "nat-rebinding":
				relay := startNATRelay(t, lb.addr())
				d.QUICServer = relay.addr()
				change = func() { relay.rebind(t) }
			default:
				d.QUICServer = lb.addr()
			}
			c := dialVia(t, d, "tcp", a.echo)
			if how == "client-migration" {
				conn := dialed(c).(interface{ Conn() *quic.Conn }).Conn()
				change = func() { migrate(t, conn) }
			}
			echoTransfer(t, c, size, change)

			lb.mu.Lock()
			defer lb.mu.Unlock()
			if len(lb.clients) != 2 {
				t.Fatalf("the load balancer saw %d client addresses, want 2 (before and after the move)", len(lb.clients))
			}
			if lb.perBack[1] != 0 {
				t.Errorf("%d packets of A's client went to B", lb.perBack[1])
			}
			// A 5-tuple balancer gives the new address the next backend in turn, B.
			if _, fallback := lb.tuples[lb.lastFrom]; fallback || lb.lastByID == 0 {
				t.Errorf("packets from the client's new address: %d routed by connection ID, by 5-tuple %t; want all by connection ID", lb.lastByID, fallback)
			}
			if lb.badCIDs != 0 {
				t.Errorf("%d packets with connection IDs of length %d that are not A's QUIC-LB IDs, such as %v", lb.badCIDs, lb.cidLen, lb.badShown)
			}
			want := 1
			if how == "client-migration" {
				want = 2 // the new path uses a new connection ID
			}
			if len(lb.cids) < want {
				t.Errorf("%d distinct routable connection IDs, want at least %d", len(lb.cids), want)
			}
			for cid := range lb.cids {
				if len(cid) != lbA.Len() || cid[0]>>5 != 2 || int(cid[0]&0x1f) != len(cid)-1 || cid[1] != 0x0a {
					t.Errorf("connection ID %x: want %d octets, config rotation 2, length bits %d, server ID 0a", cid, lbA.Len(), lbA.Len()-1)
				}
			}
		})
	}
}

func migrate(t *testing.T, conn *quic.Conn) {
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Error(err)
		return
	}
	tr := &quic.Transport{Conn: udp}
	t.Cleanup(func() { _ = tr.Close(); _ = udp.Close() })
	path, err := conn.AddPath(tr)
	if err != nil {
		t.Errorf("AddPath: %v", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := path.Probe(ctx); err != nil {
		t.Errorf("Probe: %v", err)
		return
	}
	if err := path.Switch(); err != nil {
		t.Errorf("Switch: %v", err)
	}
}

// TestQUICLBConnectionIDs: generated IDs have the fixed length, the config
// rotation and length bits, the server ID, and differ; bad configurations are
// refused.
func TestQUICLBConnectionIDs(t *testing.T) {
	t.Parallel()
	sid := []byte{0xde, 0xad, 0xbe}
	g, err := proxy.QUICLB{ConfigID: 5, ServerID: sid}.Generator()
	if err != nil {
		t.Fatal(err)
	}
	if g.ConnectionIDLen() != 12 {
		t.Fatalf("ConnectionIDLen() = %d, want 1+3+8", g.ConnectionIDLen())
	}
	seen := map[string]bool{}
	for range 1000 {
		id, err := g.GenerateConnectionID()
		if err != nil {
			t.Fatal(err)
		}
		b := id.Bytes()
		cfg, got, ok := proxy.DecodeQUICLB(b, len(sid))
		if len(b) != 12 || !ok || cfg != 5 || !bytes.Equal(got, sid) || b[0]&0x1f != 11 {
			t.Fatalf("ID %x decodes to config %d, server ID %x, ok %t; want 12 octets, config 5, length bits 11, server ID %x", b, cfg, got, ok, sid)
		}
		if seen[string(b)] {
			t.Fatalf("ID %x generated twice", b)
		}
		seen[string(b)] = true
	}
	if _, _, ok := proxy.DecodeQUICLB([]byte{0xe0 | 4, 1, 2, 3, 4}, 1); ok {
		t.Error("an ID with config rotation 7 (unroutable) decoded")
	}
	if _, _, ok := proxy.DecodeQUICLB([]byte{0x09, 1, 2, 3, 4}, 1); ok {
		t.Error("an ID whose length bits say 10 octets decoded with 5")
	}
	for _, bad := range []proxy.QUICLB{
		{ConfigID: 7, ServerID: []byte{1}}, // 7 marks unroutable IDs
		{},                                 // no server ID
		{ServerID: make([]byte, 16)},       // longer than 15
		{ServerID: []byte{1}, NonceLen: 3}, // nonce below 4
		{ServerID: make([]byte, 15), NonceLen: 5}, // 21 octets
	} {
		if _, err := bad.Generator(); err == nil {
			t.Errorf("QUICLB %+v accepted", bad)
		}
	}
}
