package bench

import (
	"fmt"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// sample is one reading of a series at t seconds since the series began.
type sample struct{ t, v float64 }

// series is a process metric read at intervals during a soak.
type series []sample

// slope is the least-squares slope of v over t, in units per second; NaN with
// fewer than two samples or no spread in t.
func (s series) slope() float64 {
	n := float64(len(s))
	if len(s) < 2 {
		return math.NaN()
	}
	var st, sv float64
	for _, x := range s {
		st += x.t
		sv += x.v
	}
	mt, mv := st/n, sv/n
	var num, den float64
	for _, x := range s {
		num += (x.t - mt) * (x.v - mv)
		den += (x.t - mt) * (x.t - mt)
	}
	if den == 0 {
		return math.NaN()
	}
	return num / den
}

// lastPart is the samples from fraction f of the series' time span onwards
// (f=0.5: the second half), where growth after warm-up shows.
func (s series) lastPart(f float64) series {
	if len(s) == 0 {
		return nil
	}
	from := s[0].t + f*(s[len(s)-1].t-s[0].t)
	i := slices.IndexFunc(s, func(x sample) bool { return x.t >= from })
	return s[i:]
}

func (s series) values() []float64 {
	v := make([]float64, len(s))
	for i, x := range s {
		v[i] = x.v
	}
	return v
}

// summary is what the README reports for a soak metric: first, last, max and
// the slope over the whole run and over its second half, per hour.
func (s series) summary() string {
	if len(s) == 0 {
		return "no samples"
	}
	hi := slices.Max(s.values())
	return fmt.Sprintf("first %s, last %s, max %s; slope %s/h (second half %s/h)",
		fmtNum(s[0].v), fmtNum(s[len(s)-1].v), fmtNum(hi),
		fmtSigned(s.slope()*3600), fmtSigned(s.lastPart(0.5).slope()*3600))
}

func fmtSigned(v float64) string {
	if v >= 0 {
		return "+" + fmtNum(v)
	}
	return fmtNum(v)
}

// runtimeTrace reads what the Go runtime of a child process prints to stderr
// with GODEBUG=gctrace=1,schedtrace=MS,scheddetail=1: the live heap after each
// garbage collection and, from each scheduler dump, the goroutines that exist
// (every G line whose status is not idle or dead). The child needs no debug
// endpoint for it. Feed it the child's stderr line by line with line.
type runtimeTrace struct {
	mu         sync.Mutex
	heapMB     float64 // live heap after the last collection; NaN before the first
	goroutines float64 // from the last complete dump; NaN before the first
	inDump     bool    // G lines of a dump are arriving
	count      int     // goroutines so far in the dump that is arriving
	lastG      time.Time
	dumpStart  time.Time
	dumpTook   time.Duration // from the SCHED line to the last G line of the last dump
	windows    []span        // when the last dumps were printed, as their lines arrived
	dumps      int
	now        func() time.Time
}

func newRuntimeTrace() *runtimeTrace {
	return &runtimeTrace{heapMB: math.NaN(), goroutines: math.NaN(), now: time.Now}
}

var (
	gcLine = regexp.MustCompile(`^gc \d+ @.* (\d+)->(\d+)->(\d+) MB`)
	gLine  = regexp.MustCompile(`^\s+G\d+: status=(\d+)`)
)

// dumpQuiet is how long after its last G line a dump counts as complete when no
// other line follows it.
const dumpQuiet = time.Second

func (r *runtimeTrace) line(s string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if m := gLine.FindStringSubmatch(s); m != nil {
		st, _ := strconv.Atoi(m[1])
		switch st &^ 0x1000 { // the scan bit
		case 0, 6, 11: // idle, dead, dead (extra M)
		default:
			r.count++
		}
		r.inDump, r.lastG = true, r.now()
		return
	}
	r.endDump()
	if strings.HasPrefix(s, "SCHED ") {
		r.count, r.dumpStart = 0, r.now()
		return
	}
	if m := gcLine.FindStringSubmatch(s); m != nil {
		r.heapMB, _ = strconv.ParseFloat(m[3], 64)
	}
}

func (r *runtimeTrace) endDump() {
	if r.inDump {
		r.goroutines, r.inDump, r.count = float64(r.count), false, 0
		r.dumpTook = r.lastG.Sub(r.dumpStart)
		r.dumps++
		if len(r.windows) == maxWindows {
			r.windows = r.windows[1:]
		}
		r.windows = append(r.windows, span{r.dumpStart, r.lastG})
	}
}

// read returns the last live heap (MB) and goroutine count seen.
func (r *runtimeTrace) read() (heapMB, goroutines float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.inDump && r.now().Sub(r.lastG) >= dumpQuiet {
		r.endDump()
	}
	return r.heapMB, r.goroutines
}

// dumpDuration is how long the runtime took to print its last scheduler dump
// (as the lines arrived): a pause of that order every sample interval is the
// cost of reading goroutines this way.
func (r *runtimeTrace) dumpDuration() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.dumpTook
}

// maxWindows bounds the dump windows kept: 512 at one per 10 s is 85 minutes.
const maxWindows = 512

// span is an interval of wall-clock time.
type span struct{ from, to time.Time }

func (a span) overlaps(b span) bool { return a.from.Before(b.to) && b.from.Before(a.to) }

// dumpWindows are the intervals in which the runtime printed its recent scheduler
// dumps, widened by dumpMargin: it holds the scheduler's lock while it prints, so
// a request in flight then waits for the instrument, not for tpd.
func (r *runtimeTrace) dumpWindows() []span {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]span, len(r.windows))
	for i, w := range r.windows {
		out[i] = span{w.from.Add(-dumpMargin), w.to.Add(dumpMargin)}
	}
	return out
}

const dumpMargin = 5 * time.Millisecond

// lineWriter splits what is written to it into lines for fn and keeps a tail
// for error messages. The runtime writes its traces in many small writes.
type lineWriter struct {
	mu   sync.Mutex
	part []byte
	fn   func(string)
	tail *tail
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.tail.Write(p)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.part = append(w.part, p...)
	for {
		i := slices.Index(w.part, '\n')
		if i < 0 {
			break
		}
		w.fn(string(w.part[:i]))
		w.part = w.part[i+1:]
	}
	if len(w.part) > 64<<10 { // no newline in 64 KiB: not a trace line
		w.part = w.part[:0]
	}
	return len(p), nil
}
