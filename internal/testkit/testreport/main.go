// Command testreport reads `go test -json` on standard input and prints what a
// person running the tests needs: the output of every failed test and package,
// one line per package (ok or FAIL, with its time), then the tests that were
// skipped, each with its reason, and the slowest packages and tests (where a
// run over the time the suite allows should be cut; a test's time is less
// any wait for a slot it reports). deploy/test.sh pipes
// the whole suite through it.
//
// It exits 1 when a test or a package failed (a build failure included) and,
// with -no-skips, when any test was skipped: on a machine that deploy/test.sh
// prepared, every tool a test needs is installed, so a skip means a test that
// checked nothing while the run looked green.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action      string
	Package     string
	Test        string
	Elapsed     float64
	Output      string
	ImportPath  string // build-output and build-fail events
	FailedBuild string
}

type testKey struct{ pkg, test string }

type skip struct {
	pkg, test, reason string
}

type pkgResult struct {
	name    string
	elapsed float64
	failed  bool
}

type report struct {
	out       io.Writer
	testOut   map[testKey][]string // output of tests still running (each running test has an entry)
	pkgOut    map[string][]string  // output of a package outside its tests
	buildOut  map[string][]string  // build output, by import path
	skips     []skip
	failed    []testKey
	why       map[testKey][]string // the first lines of a failed test's errors
	pkgs      []pkgResult
	tests     []pkgResult // top-level tests that passed in a second or more: package and name, and their time
	anyFailed bool
}

func newReport(out io.Writer) *report {
	return &report{out: out, testOut: map[testKey][]string{}, pkgOut: map[string][]string{}, buildOut: map[string][]string{}, why: map[testKey][]string{}}
}

func (r *report) add(e event) {
	k := testKey{e.Package, e.Test}
	switch e.Action {
	case "build-output":
		r.buildOut[e.ImportPath] = append(r.buildOut[e.ImportPath], e.Output)
		return
	case "build-fail":
		r.anyFailed = true
		fmt.Fprint(r.out, strings.Join(r.buildOut[e.ImportPath], ""))
		delete(r.buildOut, e.ImportPath)
		return
	case "run":
		if e.Test != "" && r.testOut[k] == nil {
			r.testOut[k] = []string{} // running: a package that dies now names it
		}
		return
	case "output":
		if e.Test == "" {
			r.pkgOut[e.Package] = append(r.pkgOut[e.Package], e.Output)
		} else {
			r.testOut[k] = append(r.testOut[k], e.Output)
		}
		return
	}
	if e.Test != "" {
		switch e.Action {
		case "fail":
			r.failed = append(r.failed, k)
			r.why[k] = reasons(r.testOut[k])
			for _, l := range r.testOut[k] {
				if !strings.HasPrefix(l, "=== ") { // RUN, PAUSE, CONT: -v's framing
					fmt.Fprint(r.out, l)
				}
			}
		case "skip":
			r.skips = append(r.skips, skip{e.Package, e.Test, skipReason(r.testOut[k])})
		}
		if e.Action == "pass" && !strings.Contains(e.Test, "/") {
			if run := e.Elapsed - waited(r.testOut[k]); run >= 1 {
				r.tests = append(r.tests, pkgResult{e.Package + " " + e.Test, run, false})
			}
		}
		if e.Action == "pass" || e.Action == "fail" || e.Action == "skip" {
			// A parent's output comes after its subtests'; theirs is no longer needed.
			delete(r.testOut, k)
		}
		return
	}
	switch e.Action {
	case "pass", "fail", "skip":
		failed := e.Action == "fail"
		if failed {
			r.anyFailed = true
			// Tests still running when the package failed (a timeout, a
			// panic in another goroutine, os.Exit) never report their own
			// end: their output is shown, and they are named with the failed
			// ones, which is the line a reader of the run's last lines sees.
			var running []testKey
			for tk := range r.testOut {
				if tk.pkg == e.Package {
					running = append(running, tk)
				}
			}
			sort.Slice(running, func(i, j int) bool { return running[i].test < running[j].test })
			for _, tk := range running {
				for _, l := range r.testOut[tk] {
					if !strings.HasPrefix(l, "=== ") {
						fmt.Fprint(r.out, l)
					}
				}
				delete(r.testOut, tk)
				r.failed = append(r.failed, testKey{tk.pkg, tk.test + " (still running when its package failed)"})
			}
			// What the package printed outside any test: a panic, a timeout's
			// goroutine dump, TestMain's complaint.
			fmt.Fprint(r.out, strings.Join(r.pkgOut[e.Package], ""))
			if e.FailedBuild != "" {
				fmt.Fprintf(r.out, "FAIL\t%s [build failed: %s]\n", e.Package, e.FailedBuild)
			} else {
				fmt.Fprintf(r.out, "FAIL\t%s\t%.3fs\n", e.Package, e.Elapsed)
			}
		} else if e.Action == "pass" {
			fmt.Fprintf(r.out, "ok  \t%s\t%.3fs\n", e.Package, e.Elapsed)
		}
		r.pkgs = append(r.pkgs, pkgResult{e.Package, e.Elapsed, failed})
		delete(r.pkgOut, e.Package)
	}
}

// waitedLine is how a test that waits for a slot of its own harness's
// (internal/tests/e2e runs its tests ten at a time) says how long it
// waited: go test counts that wait in the test's time, which is not the
// test's own cost.
var waitedLine = regexp.MustCompile(`started after (\S+) waiting`)

// waited is the wait a test's output reports, or 0.
func waited(lines []string) float64 {
	for _, l := range lines {
		if m := waitedLine.FindStringSubmatch(l); m != nil {
			if d, err := time.ParseDuration(m[1]); err == nil {
				return d.Seconds()
			}
		}
	}
	return 0
}

// reasonLine is the first line of what t.Error, t.Fatal or t.Log printed:
// the test file's name and line, then the message.
var reasonLine = regexp.MustCompile(`^\s+([\w.-]+\.go:\d+: .*)`)

// reasons are the first lines of a failed test's messages, at most four and
// each cut at 240 bytes: the summary at the run's end repeats them, because a
// failed test's full output (a server's log it dumps, say) can push the
// message out of the last lines of a run, which are often all a reader sees.
func reasons(lines []string) []string {
	var out []string
	for _, l := range lines {
		m := reasonLine.FindStringSubmatch(strings.TrimRight(l, "\n"))
		if m == nil || waitedLine.MatchString(l) {
			continue
		}
		s := m[1]
		if len(s) > 240 {
			s = strings.ToValidUTF8(s[:240], "") + "…"
		}
		if out = append(out, s); len(out) == 4 {
			break
		}
	}
	return out
}

// skipReason is what a skipped test printed, without test2json's framing lines.
func skipReason(lines []string) string {
	var b strings.Builder
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		if b.Len() > 0 {
			b.WriteString(" ")
		}
		b.WriteString(t)
	}
	if b.Len() == 0 {
		return "(no reason given)"
	}
	return b.String()
}

func (r *report) summary(noSkips bool) (ok bool) {
	w := r.out
	if len(r.skips) > 0 {
		fmt.Fprintf(w, "\n%d skipped:\n", len(r.skips))
		for _, s := range r.skips {
			fmt.Fprintf(w, "  %s %s: %s\n", strings.TrimPrefix(s.pkg, "github.com/tp-proxy/tp/"), s.test, s.reason)
		}
	}
	sort.Slice(r.pkgs, func(i, j int) bool { return r.pkgs[i].elapsed > r.pkgs[j].elapsed })
	if len(r.pkgs) > 1 {
		fmt.Fprintf(w, "\nslowest packages:")
		for _, p := range r.pkgs[:min(5, len(r.pkgs))] {
			fmt.Fprintf(w, " %s %s;", strings.TrimPrefix(p.name, "github.com/tp-proxy/tp/"), time.Duration(p.elapsed*float64(time.Second)).Round(time.Second))
		}
		fmt.Fprintln(w)
	}
	sort.Slice(r.tests, func(i, j int) bool { return r.tests[i].elapsed > r.tests[j].elapsed })
	if len(r.tests) > 0 {
		fmt.Fprintf(w, "slowest tests:")
		for _, p := range r.tests[:min(10, len(r.tests))] {
			fmt.Fprintf(w, " %s %s;", strings.TrimPrefix(p.name, "github.com/tp-proxy/tp/"), time.Duration(p.elapsed*float64(time.Second)).Round(100*time.Millisecond))
		}
		fmt.Fprintln(w)
	}
	ok = !r.anyFailed && len(r.failed) == 0
	if len(r.failed) > 0 {
		fmt.Fprintf(w, "\n%d failed:", len(r.failed))
		for _, f := range r.failed {
			fmt.Fprintf(w, " %s", f.test)
		}
		fmt.Fprintln(w)
		for _, f := range r.failed {
			for _, why := range r.why[f] {
				fmt.Fprintf(w, "  %s: %s\n", f.test, why)
			}
		}
	}
	if noSkips && len(r.skips) > 0 {
		fmt.Fprintf(w, "\n%d tests skipped on a machine this command prepared: each checked nothing. Install what it names (deploy/test.sh --deps lists the tools) or fix the test.\n", len(r.skips))
		ok = false
	}
	return ok
}

func run(in io.Reader, out io.Writer, noSkips bool) error {
	r := newReport(out)
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			// Not an event (go test's own messages): shown as they come.
			fmt.Fprintf(out, "%s\n", line)
			continue
		}
		r.add(e)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading go test's output: %w", err)
	}
	if !r.summary(noSkips) {
		return fmt.Errorf("tests failed")
	}
	return nil
}

func main() {
	noSkips := flag.Bool("no-skips", false, "fail when any test was skipped")
	flag.Parse()
	if err := run(os.Stdin, os.Stdout, *noSkips); err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(1)
	}
}
