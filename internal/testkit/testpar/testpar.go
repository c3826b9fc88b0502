package testpar

import (
	"flag"
	"strconv"
)

// Default makes n tests run at once (t.Parallel) unless -test.parallel was
// given. Call it from TestMain before m.Run; it parses the command line.
func Default(n int) {
	if !flag.Parsed() {
		flag.Parse()
	}
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		if err := flag.Set("test.parallel", strconv.Itoa(n)); err != nil {
			panic("testpar: " + err.Error()) // only without the testing package's flags
		}
	}
}
