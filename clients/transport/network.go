package transport

// Which network the host is on, for the transport cache: what worked to reach
// a server on one network (a café's Wi-Fi that drops UDP) says nothing about
// another (the office LAN), so the cache keeps an answer per server and
// network (docs/PROTOCOL.md §9.8, client rules).

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"
)

// NetworkID names the network this host reaches server (host:port) through:
// the interface the route to it leaves by, that interface's address prefix,
// and (on Linux) the route's gateway and the gateway's link-layer address, so
// that two Wi-Fi networks that both hand out 192.168.1.0/24 differ by their
// router. A server given by name is reached by the default route. It returns
// "" when the system does not say (no route): the cache then keys by server
// alone. Nothing is sent: a connected UDP socket only looks up the route.
func NetworkID(server string) string {
	host, port, err := net.SplitHostPort(server)
	if err != nil {
		return ""
	}
	target := net.JoinHostPort(host, port)
	if _, err := netip.ParseAddr(host); err != nil {
		target = "192.0.2.1:9" // TEST-NET-1 (RFC 5737): never sent to, routed by default
	}
	c, err := (&net.Dialer{Timeout: time.Second}).Dial("udp", target)
	if err != nil {
		return ""
	}
	local := c.LocalAddr().(*net.UDPAddr).IP
	_ = c.Close()
	ifname, prefix := interfaceOf(local)
	if ifname == "" {
		return ""
	}
	gw, mac := linuxGateway(ifname)
	sum := sha256.Sum256([]byte(strings.Join([]string{ifname, prefix, gw, mac}, "|")))
	return hex.EncodeToString(sum[:8])
}

// interfaceOf is the interface holding ip and the prefix of ip's network there.
func interfaceOf(ip net.IP) (string, string) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return "", ""
	}
	for _, ifc := range ifaces {
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.Equal(ip) {
				return ifc.Name, (&net.IPNet{IP: n.IP.Mask(n.Mask), Mask: n.Mask}).String()
			}
		}
	}
	return "", ""
}

// linuxGateway is the IPv4 default gateway through ifname and its link-layer
// address, read from /proc/net/route and /proc/net/arp; "" where there is none
// (another system, a directly attached network, IPv6).
func linuxGateway(ifname string) (gw, mac string) {
	f, err := os.Open("/proc/net/route")
	if err != nil {
		return "", ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 3 || fs[0] != ifname || fs[1] != "00000000" {
			continue
		}
		b, err := hex.DecodeString(fs[2])
		if err != nil || len(b) != 4 {
			continue
		}
		var ip [4]byte
		binary.LittleEndian.PutUint32(ip[:], binary.BigEndian.Uint32(b))
		gw = netip.AddrFrom4(ip).String()
		break
	}
	if gw == "" {
		return "", ""
	}
	if arp, err := os.ReadFile("/proc/net/arp"); err == nil {
		for _, line := range strings.Split(string(arp), "\n") {
			fs := strings.Fields(line)
			if len(fs) >= 6 && fs[0] == gw && fs[5] == ifname && fs[3] != "00:00:00:00:00:00" {
				mac = fs[3]
			}
		}
	}
	return gw, mac
}
