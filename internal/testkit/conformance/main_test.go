package conformance

import (
	"flag"
	"os"
	"testing"
)

// TestMain runs more cases at once than -parallel's default (GOMAXPROCS) when
// -parallel is not given: a case spends most of its time waiting for loopback
// round trips, the hello timeout and an agent's reconnect backoff, not on a
// processor.
func TestMain(m *testing.M) {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		_ = flag.Set("test.parallel", "8")
	}
	os.Exit(m.Run())
}
