package testpar

import (
	"flag"
	"testing"
)

// Default leaves an explicit -test.parallel alone and sets it otherwise.
func TestDefault(t *testing.T) {
	f := flag.Lookup("test.parallel")
	if f == nil {
		t.Fatal("no -test.parallel flag")
	}
	before := f.Value.String()
	t.Cleanup(func() { _ = flag.Set("test.parallel", before) })
	explicit := false
	flag.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "test.parallel" })

	Default(7)
	want := "7"
	if explicit {
		want = before
	}
	if got := f.Value.String(); got != want {
		t.Fatalf("-test.parallel %s after Default(7); want %s (given on the command line: %v)", got, want, explicit)
	}
}
