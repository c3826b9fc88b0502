package config

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// validZone accepts a lower-case DNS name of two or more labels.
func validZone(z string) bool {
	labels := strings.Split(z, ".")
	if len(labels) < 2 || len(z) > 200 {
		return false
	}
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for i := 0; i < len(l); i++ {
			if c := l[i]; !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// PortRange is an inclusive range of ports of one network ("tcp", "udp"), or of
// both when Net is empty.
type PortRange struct {
	Lo, Hi int
	Net    string
}

// ParsePortRanges parses public-ports: comma-separated ports and LO-HI ranges,
// each optionally limited to one network by a "/tcp" or "/udp" suffix, e.g.
// "20000-30000, 8080/tcp, 27015/udp". Without a suffix an entry opens the
// ports for TCP and UDP. Empty is no port.
func ParsePortRanges(s string) ([]PortRange, error) {
	var out []PortRange
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		ports, network, slash := strings.Cut(part, "/")
		network = strings.ToLower(strings.TrimSpace(network))
		if slash && network != "tcp" && network != "udp" {
			return nil, fmt.Errorf("%q: the network after / must be tcp or udp", part)
		}
		lo, hi, isRange := strings.Cut(ports, "-")
		a, err1 := strconv.Atoi(strings.TrimSpace(lo))
		b := a
		var err2 error
		if isRange {
			b, err2 = strconv.Atoi(strings.TrimSpace(hi))
		}
		if err1 != nil || err2 != nil || a < 1 || b > 65535 || a > b {
			return nil, fmt.Errorf("%q is not a port (1-65535) or a range LO-HI of them, optionally followed by /tcp or /udp", part)
		}
		out = append(out, PortRange{Lo: a, Hi: b, Net: network})
	}
	return out, nil
}

// PublicPortAllowed reports whether public-ports includes port for network.
func (s Server) PublicPortAllowed(network string, port int) bool {
	ranges, _ := ParsePortRanges(s.PublicPorts) // validated at start
	for _, r := range ranges {
		if r.Lo <= port && port <= r.Hi && (r.Net == "" || r.Net == network) {
			return true
		}
	}
	return false
}

// ReverseHoldsFile keeps the reverse names and public exposures devices hold,
// so a restart of tpd gives nobody else a window to take them.
func (s Server) ReverseHoldsFile() string { return filepath.Join(s.DataDir, "reverse-holds.json") }
