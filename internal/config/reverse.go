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

// PortRange is an inclusive range of ports.
type PortRange struct{ Lo, Hi int }

// ParsePortRanges parses public-ports: comma-separated ports and LO-HI ranges,
// e.g. "20000-30000, 8080". Empty is no port.
func ParsePortRanges(s string) ([]PortRange, error) {
	var out []PortRange
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(part, "-")
		a, err1 := strconv.Atoi(strings.TrimSpace(lo))
		b := a
		var err2 error
		if isRange {
			b, err2 = strconv.Atoi(strings.TrimSpace(hi))
		}
		if err1 != nil || err2 != nil || a < 1 || b > 65535 || a > b {
			return nil, fmt.Errorf("%q is not a port (1-65535) or a range LO-HI of them", part)
		}
		out = append(out, PortRange{a, b})
	}
	return out, nil
}

// PublicPortAllowed reports whether public-ports includes port.
func (s Server) PublicPortAllowed(port int) bool {
	ranges, _ := ParsePortRanges(s.PublicPorts) // validated at start
	for _, r := range ranges {
		if r.Lo <= port && port <= r.Hi {
			return true
		}
	}
	return false
}

// ReverseHoldsFile keeps the reverse names and public exposures devices hold,
// so a restart of tpd gives nobody else a window to take them.
func (s Server) ReverseHoldsFile() string { return filepath.Join(s.DataDir, "reverse-holds.json") }
