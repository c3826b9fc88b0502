// Package ephemeral reads where the kernel's ephemeral ports begin
// (net.ipv4.ip_local_port_range): the ports it hands out for a bind to port 0
// and for outgoing connections. A port below that range is taken only by an
// explicit bind, which is what tests and benchmarks that choose a port before
// a server binds it need.
package ephemeral

import (
	"os"
	"strconv"
	"strings"
)

// rangeFile is where Linux says its ephemeral port range.
const rangeFile = "/proc/sys/net/ipv4/ip_local_port_range"

// Start is the first port of the kernel's ephemeral range; ok is false when
// it cannot be read (another system, or a malformed file).
func Start() (port int, ok bool) {
	b, err := os.ReadFile(rangeFile)
	if err != nil {
		return 0, false
	}
	return parse(string(b))
}

// parse reads the range file's "FIRST LAST" and returns FIRST.
func parse(s string) (int, bool) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return 0, false
	}
	first, err := strconv.Atoi(f[0])
	if err != nil || first < 1 || first > 65535 {
		return 0, false
	}
	return first, true
}
