package ephemeral

import "testing"

// Bad input: a file that is not "FIRST LAST" with FIRST a port gives no range.
func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
		ok   bool
	}{
		{"32768\t60999\n", 32768, true},
		{"1024 65535", 1024, true},
		{"", 0, false},
		{"32768", 0, false},
		{"32768 60999 1", 0, false},
		{"x 60999", 0, false},
		{"0 60999", 0, false},
		{"70000 80000", 0, false},
	} {
		got, ok := parse(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("parse(%q) = %d, %v; want %d, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

// On this machine (Linux) the range is readable and starts at a real port.
func TestStart(t *testing.T) {
	port, ok := Start()
	if !ok || port < 1 || port > 65535 {
		t.Fatalf("Start() = %d, %v; want the first port of ip_local_port_range", port, ok)
	}
}
