package direct_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients/direct"
)

// narrowLink is a direct path between two UDP sockets through a third, which
// forwards what each sends to the other and drops datagrams above mtu bytes:
// a route whose MTU is smaller than the pair's QUIC packets.
type narrowLink struct {
	addr    netip.AddrPort // the link's own socket
	a, b    netip.AddrPort // the two ends' sockets
	mtu     int
	large   atomic.Int64 // datagrams above mtu dropped
	carried atomic.Int64
}

func newNarrowLink(t *testing.T, a, b netip.AddrPort, mtu int) *narrowLink {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: a.Addr().AsSlice()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	l := &narrowLink{addr: c.LocalAddr().(*net.UDPAddr).AddrPort(), a: a, b: b, mtu: mtu}
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if n > l.mtu {
				l.large.Add(1)
				continue
			}
			to := b
			if from == b {
				to = a
			}
			l.carried.Add(1)
			_, _ = c.WriteToUDPAddrPort(buf[:n], to)
		}
	}()
	return l
}

func loopbackUDP(t *testing.T, ip net.IP) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: ip})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// pathsOverLink are the two Paths of a pair over a loopback relay, whose
// direct path (up, as ICE would say) crosses a narrowLink of mtu bytes on
// IPv4's loopback.
func pathsOverLink(t *testing.T, mtu int) (d, a *direct.Path, link *narrowLink) {
	return pathsOverLinkOn(t, net.IPv4(127, 0, 0, 1), mtu)
}

func pathsOverLinkOn(t *testing.T, ip net.IP, mtu int) (d, a *direct.Path, link *narrowLink) {
	t.Helper()
	relayD, relayA := relayPair(t)
	d, a = direct.NewPath(relayD, nil), direct.NewPath(relayA, nil)
	t.Cleanup(func() { d.Close(); a.Close() })
	ud, ua := loopbackUDP(t, ip), loopbackUDP(t, ip)
	link = newNarrowLink(t, ud.LocalAddr().(*net.UDPAddr).AddrPort(), ua.LocalAddr().(*net.UDPAddr).AddrPort(), mtu)
	noSTUN := func([]byte, netip.AddrPort) {}
	d.AttachUDP(ud, noSTUN)
	a.AttachUDP(ua, noSTUN)
	for _, p := range []*direct.Path{d, a} {
		p.SetDirect(link.addr)
		p.SetICEUp(true)
	}
	return d, a, link
}

// send writes packets of the given sizes from d, numbered, and checks that a
// reads each of them, intact, whichever way it went.
func send(t *testing.T, d, a *direct.Path, sizes []int) {
	t.Helper()
	want := map[uint32][]byte{}
	for i, size := range sizes {
		pk := bytes.Repeat([]byte{byte(i)}, size)
		pk[0] = 0x40 // a QUIC short header's first bits, not STUN
		binary.BigEndian.PutUint32(pk[1:], uint32(i))
		want[uint32(i)] = pk
		if _, err := d.WriteTo(pk, nil); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, direct.MaxPacket)
	_ = a.SetReadDeadline(time.Now().Add(20 * time.Second))
	defer a.SetReadDeadline(time.Time{})
	for len(want) > 0 {
		n, _, err := a.ReadFrom(buf)
		if err != nil {
			t.Fatalf("%d of %d packets did not arrive: %v", len(want), len(sizes), err)
		}
		i := binary.BigEndian.Uint32(buf[1:5])
		if !bytes.Equal(buf[:n], want[i]) {
			t.Fatalf("packet %d arrived as %d bytes unlike the %d sent (or twice)", i, n, len(want[i]))
		}
		delete(want, i)
	}
}

// inGroups sends count packets of each size, a group at a time, so that no
// socket buffer on loopback overflows.
func inGroups(t *testing.T, d, a *direct.Path, count int, sizes ...int) {
	for range count / 20 {
		var group []int
		for range 20 / len(sizes) {
			group = append(group, sizes...)
		}
		send(t, d, a, group)
	}
}

// A direct path whose route drops packets of MaxPacket bytes (an MTU of
// 1400): the probe never comes through, so large packets go on the relay and
// small ones on the direct path, and every one arrives.
func TestPathLargePacketsStayRelayedOnANarrowPath(t *testing.T) {
	d, a, link := pathsOverLink(t, 1400)
	waitFor(t, "a probe of the direct path's size dropped on the way", func() bool { return link.large.Load() >= 2 })
	inGroups(t, d, a, 200, direct.MaxPacket, 1000)
	st := d.Stats()
	if st.LargeDirect || st.LargeOnRelay < 100 || st.DirectOut < 100 {
		t.Fatalf("over a path that drops %d-byte packets, 100 large and 100 small packets went: %+v; want the large ones relayed and the small ones direct", direct.MaxPacket, st)
	}
	if dropped := link.large.Load(); dropped > 20 {
		t.Fatalf("%d large datagrams were sent into a path whose probe never came through", dropped)
	}
}

// Over a path that carries them, large packets go direct once the probe came
// through (both ends probe and answer).
func TestPathLargePacketsGoDirectOnceProbed(t *testing.T) {
	d, a, _ := pathsOverLink(t, 1500)
	waitFor(t, "the dialer's probe answered", func() bool { return d.Stats().LargeDirect })
	waitFor(t, "the agent's probe answered", func() bool { return a.Stats().LargeDirect })
	before := d.Stats()
	inGroups(t, d, a, 100, direct.MaxPacket)
	st := d.Stats()
	if st.DirectOut-before.DirectOut != 100 || st.LargeOnRelay != before.LargeOnRelay || st.RelayOut != before.RelayOut {
		t.Fatalf("100 large packets on a probed direct path went: %+v (before: %+v); want all direct", st, before)
	}
}

// A probe from an address other than the other end's on the direct path
// gets no answer: the socket does not reflect traffic to strangers.
func TestPathProbeFromAStrangerUnanswered(t *testing.T) {
	d, _, link := pathsOverLink(t, 1500)
	waitFor(t, "the dialer's probe answered", func() bool { return d.Stats().LargeDirect })
	stranger := loopbackUDP(t, net.IPv4(127, 0, 0, 1))
	target := link.a // the dialer's socket
	probe := make([]byte, direct.MaxPacket)
	copy(probe, []byte{0x80, 'T', 'P', 'm', 't', 0x01, 0, 0, 0, 0, 0, 0, 0, 7})
	if _, err := stranger.WriteToUDPAddrPort(probe, target); err != nil {
		t.Fatal(err)
	}
	_ = stranger.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if n, _, err := stranger.ReadFromUDPAddrPort(make([]byte, 2048)); err == nil {
		t.Fatalf("a stranger's probe was answered with %d bytes", n)
	}
}

// Over IPv6, whose guaranteed MTU holds 1232 bytes of UDP payload, a packet
// of 1250 bytes waits for the probe as a full-size one does: over a path that
// carries 1240 bytes and no more, it goes on the relay (over IPv4 it would go
// direct), and arrives.
func TestPathIPv6SmallPacketsAreSmaller(t *testing.T) {
	if c, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6loopback}); err != nil {
		t.Fatalf("this host has no IPv6 loopback (::1), which the test needs: %v", err)
	} else {
		c.Close()
	}
	d, a, link := pathsOverLinkOn(t, net.IPv6loopback, 1240)
	waitFor(t, "a probe of the direct path's size dropped on the way", func() bool { return link.large.Load() >= 2 })
	inGroups(t, d, a, 100, 1250, 1000)
	st := d.Stats()
	if st.LargeDirect || st.LargeOnRelay < 50 || st.DirectOut < 50 {
		t.Fatalf("over an IPv6 path of 1240 bytes, 50 packets of 1250 and 50 of 1000 bytes went: %+v; want the 1250-byte ones relayed", st)
	}
}
