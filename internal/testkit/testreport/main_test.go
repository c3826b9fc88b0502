package main

import (
	"bytes"
	"strings"
	"testing"
)

// A run as `go test -json` prints it: one package passes with a skipped test,
// one fails a test, one fails to build.
const stream = `{"Action":"start","Package":"example/a"}
{"Action":"run","Package":"example/a","Test":"TestNeedsTool"}
{"Action":"output","Package":"example/a","Test":"TestNeedsTool","Output":"=== RUN   TestNeedsTool\n"}
{"Action":"output","Package":"example/a","Test":"TestNeedsTool","Output":"    a_test.go:9: sshd is not installed\n"}
{"Action":"output","Package":"example/a","Test":"TestNeedsTool","Output":"--- SKIP: TestNeedsTool (0.00s)\n"}
{"Action":"skip","Package":"example/a","Test":"TestNeedsTool","Elapsed":0}
{"Action":"output","Package":"example/a","Output":"ok  \texample/a\t0.010s\n"}
{"Action":"pass","Package":"example/a","Elapsed":0.01}
{"Action":"run","Package":"example/b","Test":"TestBroken"}
{"Action":"output","Package":"example/b","Test":"TestBroken","Output":"=== RUN   TestBroken\n"}
{"Action":"output","Package":"example/b","Test":"TestBroken","Output":"    harness_test.go:82: started after 1s waiting for one of 10 slots (-parallel)\n"}
{"Action":"output","Package":"example/b","Test":"TestBroken","Output":"    b_test.go:5: want 1, got 2\n"}
{"Action":"output","Package":"example/b","Test":"TestBroken","Output":"--- FAIL: TestBroken (0.00s)\n"}
{"Action":"fail","Package":"example/b","Test":"TestBroken","Elapsed":0}
{"Action":"run","Package":"example/b","Test":"TestFine"}
{"Action":"output","Package":"example/b","Test":"TestFine","Output":"    harness_test.go:82: started after 10.5s waiting for one of 10 slots (-parallel)\n"}
{"Action":"output","Package":"example/b","Test":"TestFine","Output":"fine's chatter\n"}
{"Action":"pass","Package":"example/b","Test":"TestFine","Elapsed":11.74}
{"Action":"output","Package":"example/b","Output":"FAIL\n"}
{"Action":"fail","Package":"example/b","Elapsed":0.02}
{"ImportPath":"example/c [example/c.test]","Action":"build-output","Output":"c.go:3:1: syntax error\n"}
{"ImportPath":"example/c [example/c.test]","Action":"build-fail"}
{"Action":"fail","Package":"example/c","Elapsed":0,"FailedBuild":"example/c [example/c.test]"}
`

func TestReport(t *testing.T) {
	for _, noSkips := range []bool{false, true} {
		var out bytes.Buffer
		if err := run(strings.NewReader(stream), &out, noSkips); err == nil {
			t.Errorf("noSkips=%v: a run with a failed test and a failed build was reported as passing", noSkips)
		}
		got := out.String()
		for _, want := range []string{
			"ok  \texample/a\t0.010s",
			"b_test.go:5: want 1, got 2",
			"--- FAIL: TestBroken",
			"FAIL\texample/b\t0.020s",
			"c.go:3:1: syntax error",
			"FAIL\texample/c [build failed",
			"1 skipped:\n  example/a TestNeedsTool: a_test.go:9: sshd is not installed",
			"1 failed: TestBroken\n  TestBroken: b_test.go:5: want 1, got 2\n",
			"slowest tests: example/b TestFine 1.2s;",
		} {
			if !strings.Contains(got, want) {
				t.Errorf("noSkips=%v: the report lacks %q:\n%s", noSkips, want, got)
			}
		}
		for _, unwanted := range []string{"fine's chatter", "=== RUN"} {
			if strings.Contains(got, unwanted) {
				t.Errorf("noSkips=%v: the report shows %q, which only -v shows:\n%s", noSkips, unwanted, got)
			}
		}
		if skipLine := "tests skipped on a machine this command prepared"; strings.Contains(got, skipLine) != noSkips {
			t.Errorf("noSkips=%v: the skip verdict's presence is wrong:\n%s", noSkips, got)
		}
	}
}

// A green run with a skip passes, unless skips are refused.
func TestSkipAlone(t *testing.T) {
	green := strings.Join(strings.Split(stream, "\n")[:8], "\n") + "\n"
	if err := run(strings.NewReader(green), &bytes.Buffer{}, false); err != nil {
		t.Errorf("a green run with a skip failed without -no-skips: %v", err)
	}
	var out bytes.Buffer
	if err := run(strings.NewReader(green), &out, true); err == nil {
		t.Errorf("a run with a skipped test passed with -no-skips:\n%s", out.String())
	}
}

// A package that times out: its hung test never reports an end, and is named
// among the failed ones, after the package's goroutine dump; a test that
// passed before it is not.
func TestHungTestNamed(t *testing.T) {
	const hung = `{"Action":"run","Package":"example/d","Test":"TestQuick"}
{"Action":"pass","Package":"example/d","Test":"TestQuick","Elapsed":0}
{"Action":"run","Package":"example/d","Test":"TestConn"}
{"Action":"run","Package":"example/d","Test":"TestConn/Concurrent"}
{"Action":"output","Package":"example/d","Test":"TestConn/Concurrent","Output":"    d_test.go:7: waiting for the reader\n"}
{"Action":"output","Package":"example/d","Output":"panic: test timed out after 45m0s\n"}
{"Action":"fail","Package":"example/d","Elapsed":2700}
`
	var out bytes.Buffer
	if err := run(strings.NewReader(hung), &out, false); err == nil {
		t.Fatalf("a package that timed out was reported as passing:\n%s", out.String())
	}
	got := out.String()
	for _, want := range []string{
		"d_test.go:7: waiting for the reader",
		"panic: test timed out after 45m0s",
		"2 failed: TestConn (still running when its package failed) TestConn/Concurrent (still running when its package failed)",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("the report lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "TestQuick") {
		t.Errorf("the report names a test that passed:\n%s", got)
	}
}
