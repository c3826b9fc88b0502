package bench

import (
	"math"
	"strings"
	"testing"
	"time"
)

func TestSeriesSlope(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    series
		want float64
	}{
		{"flat", series{{0, 5}, {10, 5}, {20, 5}}, 0},
		{"rising 2 per second", series{{0, 1}, {1, 3}, {2, 5}, {3, 7}}, 2},
		{"noisy but falling", series{{0, 10}, {10, 6}, {20, 8}, {30, 0}}, -0.28},
		{"uneven spacing", series{{0, 0}, {1, 1}, {9, 9}}, 1},
	} {
		if got := tc.s.slope(); math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("%s: slope %v, want %v", tc.name, got, tc.want)
		}
	}
	// Too few samples or all at one instant have no slope, rather than 0 (which
	// would read as "flat").
	for _, s := range []series{nil, {{3, 1}}, {{2, 1}, {2, 9}}} {
		if got := s.slope(); !math.IsNaN(got) {
			t.Errorf("slope of %v = %v, want NaN", s, got)
		}
	}
}

func TestSeriesLastPartAndSummary(t *testing.T) {
	// Grows in the first half (warm-up), flat in the second.
	s := series{{0, 100}, {10, 150}, {20, 200}, {30, 200}, {40, 200}}
	if got := s.lastPart(0.5); len(got) != 3 || got[0].t != 20 {
		t.Fatalf("second half = %v, want the samples from t=20", got)
	}
	sum := s.summary()
	for _, want := range []string{"first 100", "last 200", "max 200", "(second half +0/h)"} {
		if !strings.Contains(sum, want) {
			t.Errorf("summary %q lacks %q", sum, want)
		}
	}
	if !strings.Contains(sum, "slope +9000/h") { // 2.5/s over the whole run
		t.Errorf("summary %q: want the whole-run slope +9000/h", sum)
	}
}

// A trace as tpd's runtime prints it with GODEBUG=gctrace=1,schedtrace,scheddetail=1,
// with a log line of tpd's own between two dumps.
const traceSample = `SCHED 1004ms: gomaxprocs=2 idleprocs=2 threads=6 spinningthreads=0 needspinning=0 idlethreads=3 runqueue=0 gcwaiting=false nmidlelocked=0 stopwait=0 sysmonwait=false
  P0: status=0 schedtick=7 syscalltick=3 m=nil runqsize=0 gfreecnt=0 timerslen=1
  M0: p=nil curg=nil mallocing=0 throwing=0 preemptoff= locks=0 dying=0 spinning=false blocked=true lockedg=nil
  G1: status=4(chan receive) m=nil lockedm=nil
  G2: status=4(force gc (idle)) m=nil lockedm=nil
  G3: status=6() m=nil lockedm=nil
  G4: status=4100(select) m=nil lockedm=nil
  G5: status=1() m=nil lockedm=nil
time=2026-12-02T06:00:00Z level=INFO msg="session closed"
gc 7 @2.345s 1%: 0.02+1.1+0.01 ms clock, 0.05+0.2/0.9/0+0.03 ms cpu, 12->13->7 MB, 14 MB goal, 0 MB stacks, 0 MB globals, 2 P
SCHED 2008ms: gomaxprocs=2 idleprocs=2 threads=6 spinningthreads=0 needspinning=0 idlethreads=3 runqueue=0 gcwaiting=false nmidlelocked=0 stopwait=0 sysmonwait=false
  G1: status=4(chan receive) m=nil lockedm=nil
  G3: status=6() m=nil lockedm=nil
  G9: status=11() m=nil lockedm=nil
`

func TestRuntimeTrace(t *testing.T) {
	clock := time.Unix(0, 0)
	r := newRuntimeTrace()
	r.now = func() time.Time { return clock }
	if h, g := r.read(); !math.IsNaN(h) || !math.IsNaN(g) {
		t.Fatalf("before any trace: heap %v, goroutines %v; want NaN (unknown), not 0", h, g)
	}
	w := &lineWriter{fn: r.line, tail: &tail{}}
	// Written in pieces that split lines, as the runtime's many small writes do.
	for i := 0; i < len(traceSample); i += 7 {
		w.Write([]byte(traceSample[i:min(i+7, len(traceSample))]))
	}
	// The first dump ended at the log line: G1, G2, G4 (waiting, with the scan
	// bit), G5 exist; G3 is dead. The second dump is still open.
	h, g := r.read()
	if h != 7 {
		t.Errorf("live heap %v MB, want 7 (the third figure of 12->13->7)", h)
	}
	if g != 4 {
		t.Errorf("goroutines %v after the first dump, want 4", g)
	}
	if w := r.dumpWindows(); len(w) != 1 {
		t.Errorf("%d dump windows after one complete dump, want 1", len(w))
	}
	// No further line: the second dump counts once it has been quiet for a while.
	clock = clock.Add(dumpQuiet)
	if _, g := r.read(); g != 1 {
		t.Errorf("goroutines %v after the second dump, want 1 (dead and dead-extra Gs do not count)", g)
	}
}

func TestCanaryWithoutDumps(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	c := canaryResult{
		ms: []float64{3, 70, 4, 5},
		at: []span{
			{t0, t0.Add(ms(3))},
			{t0.Add(ms(100)), t0.Add(ms(170))}, // held up by the dump at 150–200 ms
			{t0.Add(ms(200)), t0.Add(ms(204))}, // starts as the dump ends: overlaps at an instant only
			{t0.Add(ms(300)), t0.Add(ms(305))},
		},
		failed: 1,
	}
	got := c.without([]span{{t0.Add(ms(150)), t0.Add(ms(200))}})
	if got.excluded != 1 || len(got.ms) != 3 || got.ms[1] != 4 {
		t.Fatalf("without the dump: %v, %d excluded; want [3 4 5], 1 excluded", got.ms, got.excluded)
	}
	if got.failed != 1 {
		t.Errorf("failures %d, want 1: leaving out samples must not hide failures", got.failed)
	}
	if len(c.ms) != 4 {
		t.Errorf("the original result lost samples: %v", c.ms)
	}
}
