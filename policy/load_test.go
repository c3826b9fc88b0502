//go:build linux

package policy_test

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tp-proxy/tp/policy"
)

// workPolicy scans input.payload with a regular expression for an ordinary request
// (processor time in proportion to its length, nothing kept) and runs 25 million
// steps for the host "runaway".
const workPolicy = `package tp.authz

default allow := false

allow if {
	input.destination.host != "runaway"
	not regex.match("^[a-z]*[0-9]$", input.payload)
}

allow if {
	input.destination.host == "runaway"
	count([1 | some i in numbers.range(1, 5000); some j in numbers.range(1, 5000); i * j < 0]) > 0
}
`

func workInput(host, payload string) map[string]any {
	in := input("bob", "pc", nil, "dial", host, 443, "93.184.215.14")
	in["payload"] = payload
	return in
}

// threadCPU returns the processor time the calling thread has used.
func threadCPU(t *testing.T) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// A saturated engine does not deny legitimate requests, and still stops a runaway
// evaluation. The bad input is load: 25 evaluations per processor at once, each
// needing more than the scheduler's 10 ms time slice, under a timeout ten times
// the processor time one needs, on a machine that other processes keep busy too.
// Before, the timeout ran from the call, so evaluations that were preempted and
// queued behind the others ran out of time and were denied with a policy error
// although each needed a tenth of its budget.
func TestSaturatedEvaluationsAreNotDenied(t *testing.T) {
	dir := writePolicy(t, map[string]string{"p.rego": workPolicy})
	// Size the payload so that one evaluation needs 12 to 24 ms of processor time
	// on this machine and build: a measurement that sizes the test, not an assertion.
	calib := load(t, dir, policy.WithTimeout(time.Minute))
	runtime.LockOSThread()
	payload := "abcdefgh"
	var need time.Duration
	for {
		before := threadCPU(t)
		if res, err := calib.Eval(context.Background(), workInput("ok", payload)); err != nil || !res.Allow {
			runtime.UnlockOSThread()
			t.Fatalf("calibration: %+v, %v", res, err)
		}
		if need = threadCPU(t) - before; need >= 12*time.Millisecond || len(payload) >= 1<<28 {
			break
		}
		payload += payload
	}
	runtime.UnlockOSThread()
	timeout := 10 * need
	// The queue timeout (5 s by default) bounds a call in wall time, waiting
	// included, and is tested on its own (TestEvalQueueTimeout): here the
	// machine's other processes may leave this one a small share of its
	// processors, and 27 rounds of evaluations must not run into it, or a
	// legitimate request is denied as overload, which is not what is tested.
	e := load(t, dir, policy.WithTimeout(timeout), policy.WithQueueTimeout(10*time.Minute))

	legit := 25 * runtime.GOMAXPROCS(0)
	const runaways = 2
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, legit+runaways)
	for i := range legit + runaways {
		host := "ok"
		if i%(legit/runaways+1) == 0 {
			host = "runaway"
		}
		in := workInput(host, payload)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			res, err := e.Eval(context.Background(), in)
			switch {
			case host == "runaway" && (err == nil || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "did not finish within "+timeout.String())):
				errs <- errors.New("runaway evaluation was not stopped by the timeout: " + errString(err))
			case host == "ok" && (err != nil || !res.Allow):
				errs <- errors.New("legitimate request denied under load: " + errString(err))
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	n := 0
	for err := range errs {
		if n++; n <= 3 {
			t.Error(err)
		}
	}
	if n > 0 {
		t.Fatalf("%d of %d evaluations went wrong (one needs %s of processor time, the timeout is %s)", n, legit+runaways, need, timeout)
	}
}

func errString(err error) string {
	if err == nil {
		return "no error"
	}
	return err.Error()
}
